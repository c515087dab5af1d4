"""The decision threshold a run stores (ours: the paper reports AUROCs only), never set on the test split.

Rules (--threshold-rule; the checkpoint and metrics.json say which set it):
- synthetic (default): the held-out normal images and K = 4 synthetic anomalies made from each by the run's own
  synthesizer (an epoch training never reaches); the threshold where the F1 of telling them apart is highest, the
  normals weighted K times (both classes count alike), in the middle of the gap below the lowest score it flags
  (two classes apart: halfway between them; ties: the highest such cut); floored at median + 1.4826 MAD of the normals' scores
  (about their 84th percentile), so that it never flags most normal images when the synthetic anomalies are missed.
- quantile: the --threshold-quantile quantile of the held-out normals' scores.
- calibrate (train --calibrate DIR): the same F1 rule on a labelled folder of real images (good/ and defect folders),
  unweighted and without a floor.
Every rule's value is stored beside the one chosen (by_rule), so that an evaluation reports each one's verdicts.
"""
import numpy as np
import torch

from extras.anomalies import trainset
from extras.folders import labelled_folder
from extras.options import ints
from extras.speed import precision

K = 4  # synthetic anomalies per held-out normal image
EPOCH = 10 ** 6  # the synthesizer's epoch for them: one training never reaches


def summary(scores):
    s = np.asarray(scores, np.float64)
    return {k: round(float(f(s)), 6) for k, f in (("min", np.min), ("median", np.median), ("mean", np.mean),
                                                   ("max", np.max))}


def f1_midpoint(normal, anomalous, normal_weight=1.0):
    """(threshold, its F1): the F1-optimal threshold (score >= it is anomalous) between two sets of scores, each
    normal score counted normal_weight times, in the middle of the gap below the lowest score it flags; where cuts
    tie, the highest (the fewest images flagged)."""
    normal, anomalous = np.asarray(normal, np.float64), np.asarray(anomalous, np.float64)
    cuts = np.unique(np.concatenate([normal, anomalous]))  # flag >= cuts[k]: the same verdicts on (cuts[k-1], cuts[k]]
    tp = (anomalous[None] >= cuts[:, None]).sum(1)
    fp = normal_weight * (normal[None] >= cuts[:, None]).sum(1)
    f1 = 2 * tp / (2 * tp + fp + (len(anomalous) - tp))
    k = np.flatnonzero(f1 >= f1.max() - 1e-12)[-1]
    return float((cuts[k - 1] + cuts[k]) / 2 if k else cuts[0]), float(f1.max())


def from_normals(normal, cfg, opts):
    """A threshold dict of the quantile rule from normal images' scores (import-authors' --threshold-from)."""
    s = np.asarray(normal, np.float64)
    t = {"eval_t": ",".join(map(str, cfg.eval_t)), "top_k": cfg.top_k, "variant": opts.variant, "rule": "quantile",
         "value": float(np.quantile(s, opts.threshold_quantile)), "quantile": opts.threshold_quantile,
         "n_held_out": len(s), "held_out_scores": summary(s)}
    t["by_rule"] = {"quantile": t["value"]}
    return t


def synthetic_rule(t, normal, held_out, scores_of, cfg, opts):
    """Adds the synthetic rule's value (and its inputs' summaries) to the threshold dict of the held-out normals'
    scores `normal`."""
    ts = trainset(held_out, cfg, opts)  # the run's synthesizer on the held-out images
    synthetic = scores_of(torch.stack([ts[(EPOCH + k, i, True)]["image"] for k in range(K) for i in range(len(ts))]))
    s = np.asarray(normal, np.float64)
    floor = float(np.median(s) + 1.4826 * np.median(np.abs(s - np.median(s))))
    value, f1 = f1_midpoint(s, synthetic, normal_weight=K)
    t["by_rule"]["synthetic"] = max(value, floor)
    t.update(n_synthetic=len(synthetic), synthetic_scores=summary(synthetic), synthetic_f1=round(f1, 4),
             floor=round(floor, 6))


def decide(run, scores_of, cfg, opts):
    """The threshold a run stores: its rule's (opts.threshold_rule, or --calibrate's folder) beside every rule it has
    the images for; None without a held-out slice or a calibration folder. scores_of: images (N,3,H,W) -> scores."""
    if run.held_out is None and not opts.calibrate:
        return None
    if run.held_out is not None:
        normal = scores_of(torch.stack([run.held_out[i]["image"] for i in range(len(run.held_out))]))
        t = from_normals(normal, cfg, opts)
        synthetic_rule(t, normal, run.held_out, scores_of, cfg, opts)
    else:
        t = {"eval_t": ",".join(map(str, cfg.eval_t)), "top_k": cfg.top_k, "variant": opts.variant, "by_rule": {}}
    if opts.calibrate:
        folder = labelled_folder(opts.calibrate, cfg.img_size)
        labels = np.array([r[2] for r in folder.records])
        scores = np.asarray(scores_of(torch.stack([folder[i]["image"] for i in range(len(folder))])), np.float64)
        value, f1 = f1_midpoint(scores[labels == 0], scores[labels == 1])
        t["by_rule"]["calibrate"] = value
        t["calibration"] = {"folder": str(opts.calibrate), "n_good": int((labels == 0).sum()),
                            "n_anomalous": int((labels == 1).sum()), "f1": round(f1, 4)}
    t["rule"] = "calibrate" if opts.calibrate else opts.threshold_rule
    t["value"] = t["by_rule"][t["rule"]]
    t["precision"] = precision(opts, run.device)  # of the scores it was set on
    print(f"threshold {t['value']:.6f}: {describe(t)}")
    return t


def describe(t):
    """Where a stored threshold comes from, in words."""
    if t.get("rule") == "calibrate":
        c = t["calibration"]
        return f"the F1 optimum of {c['n_good']} good and {c['n_anomalous']} anomalous images of {c['folder']}"
    if t.get("rule") == "synthetic":
        return (f"the F1 optimum between {t['n_held_out']} held-out normal images and {t['n_synthetic']} synthetic "
                f"anomalies made from them, floored at {t['floor']:.6f}")
    return f"the {t['quantile']} quantile of {t['n_held_out']} held-out normal images' scores"


def stored(state, cfg, opts, path, override=None):
    """(threshold or None, where it comes from): --threshold, else the checkpoint's when it was set with the same
    inference (algorithm, time steps, top-K) as this command's."""
    t = state.get("threshold")
    if override is not None:
        return override, "--threshold"
    if t is None:
        return None, f"{path} stores none (trained with --holdout 0 or by an earlier version); pass --threshold X"
    theirs = (t.get("variant", "paper"), ",".join(map(str, ints(t["eval_t"]))), t["top_k"])
    ours = (opts.variant, ",".join(map(str, cfg.eval_t)), cfg.top_k)
    if theirs != ours:
        return None, (f"{path}'s threshold was set with the {theirs[0]} inference at t = {theirs[1]}, top-{theirs[2]}, "
                      f"not this command's {ours[0]} inference at t = {ours[1]}, top-{ours[2]}; pass --threshold X")
    return t, describe(t)


def verdicts(threshold, scores, labels, f1_max):
    """What a threshold dict does on a test split: for its value and every rule beside it, the fractions of good and
    anomalous images flagged and the image F1 (score >= threshold is anomalous), with the split's F1-max."""
    def one(value):
        flagged = scores >= value
        tp, fp, fn = int((flagged & (labels == 1)).sum()), int((flagged & (labels == 0)).sum()), int((~flagged & (labels == 1)).sum())
        rate = lambda sel: float(flagged[sel].mean()) if sel.any() else None
        return {"threshold": float(value), "good": rate(labels == 0), "anomalous": rate(labels == 1),
                "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None}
    out = {**one(threshold["value"]), "rule": threshold.get("rule", "quantile"), "image_f1_max": f1_max}
    out["by_rule"] = {rule: one(v) for rule, v in threshold.get("by_rule", {}).items()}
    return out
