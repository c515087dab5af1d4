"""Tests for metrics.py: hand-computed PRO cases, limiting cases, agreement with scikit-learn and a
brute-force PRO, invariance to increasing transforms, and every error message; and the benchmark table beside the
paper's numbers (extras/benchmarks.py) and scripts/seeds.py."""
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

import metrics
from extras.benchmarks import PAPER, table
from extras.reports import COLUMNS
from metrics import evaluate, image_ap, image_auroc, image_f1_max, pixel_ap, pixel_auroc, pixel_f1_max, pro


def a(rows):
    return np.array(rows, dtype=float)


# ---------------------------------------------------------------- hand-computed PRO cases
def test_pro_is_mean_over_regions_not_pooled_overlap():
    # Image 1 (1x4): a 1-pixel region scored 0.9, three normals at 0.5.
    # Image 2 (1x5): a 4-pixel region scored 0.9, 0.2, 0.2, 0.2 and one normal at 0.5.
    # t=0.9: overlaps 1/1 and 1/4 -> PRO = (1 + 0.25) / 2 = 0.625 (pooled overlap would be 2/5 = 0.4);
    #        FPR = 0/4.  t=0.5: FPR = 4/4 = 1, PRO still 0.625.  t=0.2: PRO = 1, FPR = 1.
    # Curve (0,0) -> (0,0.625) -> (1,0.625) -> (1,1): area up to 0.3 = 0.3 * 0.625, / 0.3 = 0.625.
    masks = [a([[1, 0, 0, 0]]), a([[1, 1, 1, 1, 0]])]
    maps = [a([[0.9, 0.5, 0.5, 0.5]]), a([[0.9, 0.2, 0.2, 0.2, 0.5]])]
    assert pro(masks, maps) == pytest.approx(0.625)


def test_defect_free_image_false_positives_lower_pro():
    # Image 1 (1x4) alone is perfect: region [0.8, 0.8] above normals [0.2, 0.2] -> PRO 1.
    masks, maps = [a([[1, 1, 0, 0]])], [a([[0.8, 0.8, 0.2, 0.2]])]
    assert pro(masks, maps) == pytest.approx(1.0)
    # Add a defect-free image (1x4) with one normal pixel at 0.9; now 6 normal pixels in all.
    # t=0.9: FPR = 1/6, PRO = 0.  t=0.8: FPR = 1/6, PRO = 1.  t=0.2: FPR = 1, PRO = 1.
    # Curve (0,0) -> (1/6,0) -> (1/6,1) -> (1,1): area up to 0.3 = (0.3 - 1/6) * 1 = 0.1333...,
    # / 0.3 = 4/9.
    masks.append(a([[0, 0, 0, 0]]))
    maps.append(a([[0.9, 0.2, 0.2, 0.2]]))
    assert pro(masks, maps) == pytest.approx(4 / 9)


def test_diagonal_pixels_are_one_region_with_8_connectivity():
    # Image 1 (2x2): anomalous pixels on the diagonal, scores 0.9 (top-left) and 0.1; normals 0.5.
    # Image 2 (1x2): a 1-pixel region scored 0.1, one normal at 0.5.
    # 8-connectivity: regions {diagonal pair}, {image 2 pixel}. At t=0.9: overlaps 1/2 and 0
    # -> PRO 0.25, FPR 0; at t=0.5 FPR jumps to 1.  Normalised PRO = 0.25.
    # (4-connectivity would give regions {a}, {b}, {c}: (1 + 0 + 0) / 3 = 1/3.)
    masks = [a([[1, 0], [0, 1]]), a([[1, 0]])]
    maps = [a([[0.9, 0.5], [0.5, 0.1]]), a([[0.1, 0.5]])]
    assert pro(masks, maps) == pytest.approx(0.25)


# ---------------------------------------------------------------- limiting cases
def random_set(rng, n=6):
    """Masks of differing sizes with a few rectangles, half the images defect-free."""
    masks = []
    for i in range(n):
        m = np.zeros((rng.integers(8, 20), rng.integers(8, 20)), bool)
        for _ in range(rng.integers(1, 4) if i % 2 else 0):
            y, x = rng.integers(0, m.shape[0] - 2), rng.integers(0, m.shape[1] - 2)
            m[y:y + rng.integers(1, 4), x:x + rng.integers(1, 4)] = True
        masks.append(m)
    return masks


def test_perfect_inverted_and_constant_maps():
    rng = np.random.default_rng(0)
    masks = random_set(rng)
    labels = np.array([m.any() for m in masks])
    perfect = [m + 0.5 * rng.random(m.shape) for m in masks]  # every anomalous pixel > every normal
    inverted = [-p for p in perfect]
    constant = [np.full(m.shape, 3.0) for m in masks]
    s = labels + 0.5 * rng.random(labels.size)
    assert image_auroc(labels, s) == pytest.approx(1.0)
    assert image_auroc(labels, -s) == pytest.approx(0.0)
    assert image_auroc(labels, np.ones(labels.size)) == pytest.approx(0.5)
    assert pixel_auroc(masks, perfect) == pytest.approx(1.0)
    assert pixel_ap(masks, perfect) == pytest.approx(1.0)
    assert pro(masks, perfect) == pytest.approx(1.0)
    assert pixel_auroc(masks, inverted) == pytest.approx(0.0)
    assert pro(masks, inverted) == pytest.approx(0.0)
    assert pixel_auroc(masks, constant) == pytest.approx(0.5)
    # Constant map: one threshold, the curve is the diagonal; area to 0.3 = 0.045, / 0.3 = 0.15.
    assert pro(masks, constant) == pytest.approx(0.15)


# ---------------------------------------------------------------- agreement with references
def brute_force_pro(masks, maps, limit):
    """PRO by the definition: loop over every distinct score and every region."""
    masks = [m > 0.5 for m in masks]
    regions = [lab == r for m in masks
               for lab, n in [ndimage.label(m, structure=np.ones((3, 3)))] for r in range(1, n + 1)]
    regions_maps = [mp for m, mp in zip(masks, maps)
                    for _ in range(ndimage.label(m, structure=np.ones((3, 3)))[1])]
    n_normal = sum((~m).sum() for m in masks)
    xs, ys = [0.0], [0.0]
    for t in np.unique(np.concatenate([mp.ravel() for mp in maps]))[::-1]:
        xs.append(sum(((mp >= t) & ~m).sum() for m, mp in zip(masks, maps)) / n_normal)
        ys.append(np.mean([(mp[r] >= t).mean() for r, mp in zip(regions, regions_maps)]))
    xs, ys = np.array(xs + [1.0]), np.array(ys + [1.0])
    j = np.argmax(xs >= limit)  # first point at or beyond the limit; interpolate from the one before
    y_lim = ys[j - 1] + (ys[j] - ys[j - 1]) * (limit - xs[j - 1]) / (xs[j] - xs[j - 1])
    return np.trapezoid(np.r_[ys[:j], y_lim], np.r_[xs[:j], limit]) / limit


@pytest.mark.parametrize("seed", range(4))
def test_agrees_with_sklearn_and_brute_force(seed):
    rng = np.random.default_rng(seed)
    masks = random_set(rng)
    maps = [np.round(rng.random(m.shape) + 0.3 * m, 1) for m in masks]  # rounding makes ties
    y, s = np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps])
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert pixel_ap(masks, maps) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    for limit in (0.3, 0.05, 1.0):
        assert pro(masks, maps, limit) == pytest.approx(brute_force_pro(masks, maps, limit), abs=1e-12)
    labels, scores = rng.random(50) < 0.4, np.round(rng.random(50), 1)
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_ap(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_invariant_to_strictly_increasing_transform():
    rng = np.random.default_rng(5)
    masks = random_set(rng, n=8)
    maps = [np.round(rng.random(m.shape) + 0.5 * m, 2) for m in masks]
    labels = np.array([m.any() for m in masks])
    scores = np.array([mp.max() for mp in maps]) - 0.3 * rng.random(labels.size)
    f = lambda x: np.exp(3 * x) + x ** 3 - 7  # strictly increasing
    before, after = evaluate(maps, masks, labels, scores), evaluate([f(m) for m in maps], masks,
                                                                    labels, f(scores))
    assert all(0.1 < v < 0.99 for v in before.values())  # non-trivial values
    assert after == pytest.approx(before, abs=1e-12)
    # The same maps as one (N, H, W) array and as float32 give the same result as the list.
    crop = [m[:8, :8] for m in masks], [mp[:8, :8] for mp in maps]
    assert pro(np.stack(crop[0]), np.stack(crop[1]).astype(np.float32)) == pytest.approx(pro(*crop))


def test_mask_scaling():
    rng = np.random.default_rng(3)
    masks = random_set(rng)
    maps = [rng.random(m.shape) + 0.3 * m for m in masks]
    ref = pro(masks, maps)
    assert pro([m.astype(np.uint8) for m in masks], maps) == ref           # 0/1 integers
    assert pro([m.astype(np.uint8) * 255 for m in masks], maps) == ref     # 8-bit image
    assert pro([m * 128 + (~m) * 127 for m in masks], maps) == ref          # > 127.5 of 255
    assert pro([m * 0.51 + (~m) * 0.5 for m in masks], maps) == ref         # float: > 0.5


# ---------------------------------------------------------------- errors
def test_undefined_metrics_raise():
    m, mp = [np.zeros((2, 2))], [np.ones((2, 2))]
    for f in (pixel_auroc, pixel_ap, pro):
        with pytest.raises(metrics.UndefinedMetricError, match="no anomalous pixel"):
            f(m, mp)
        with pytest.raises(ValueError, match="no normal pixel"):
            f([np.ones((2, 2))], mp)
    for f in (image_auroc, image_ap):
        with pytest.raises(ValueError, match="no anomalous image"):
            f([0, 0], [0.1, 0.2])
        with pytest.raises(ValueError, match="no normal image"):
            f([1, 1], [0.1, 0.2])


def test_evaluate_on_good_images_only_returns_nan_with_warnings():
    maps, masks = np.random.default_rng(0).random((3, 4, 4)), np.zeros((3, 4, 4), bool)
    with pytest.warns(RuntimeWarning, match="undefined") as record:
        out = evaluate(maps, masks, [0, 0, 0], [0.1, 0.2, 0.3])
    assert set(out) == {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max",
                        "pixel_pro"}
    assert all(np.isnan(v) for v in out.values()) and len(record) == 7
    # Image labels mixed but no anomalous pixel: image metrics are still reported.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = evaluate(maps, masks, [0, 1, 1], [0.1, 0.2, 0.3])
    assert out["image_auroc"] == pytest.approx(1.0) and np.isnan(out["pixel_pro"])


def test_invalid_input_raises_with_message():
    maps, masks = [np.zeros((2, 2)), np.zeros((3, 2))], [np.zeros((2, 2)), np.eye(3, 2)]
    bad = [maps[0], np.array([[0.0, np.nan], [0, 0], [0, 0]])]
    with pytest.raises(ValueError, match=r"maps\[1\] contains NaN or inf"):
        pro(masks, bad)
    with pytest.raises(ValueError, match=r"maps\[1\] contains NaN or inf"):
        evaluate(bad, masks, [0, 1], [0.1, 0.2])  # invalid input is an error even in evaluate
    with pytest.raises(ValueError, match=r"maps\[0\] contains NaN or inf"):
        pixel_auroc(masks, [np.full((2, 2), np.inf), maps[1]])
    with pytest.raises(ValueError, match=r"scores\[1\] is nan"):
        image_auroc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match=r"scores\[0\] is inf"):
        evaluate(maps, masks, [0, 1], [np.inf, 0.2])
    with pytest.raises(ValueError, match=r"maps\[1\] has shape \(2, 3\) but masks\[1\] has shape \(3, 2\)"):
        pixel_ap(masks, [maps[0], np.zeros((2, 3))])
    with pytest.raises(ValueError, match="got 2 maps but 1 masks"):
        pro(masks[:1], maps)
    with pytest.raises(ValueError, match="got 2 maps but 3 labels"):
        evaluate(maps, masks, [0, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match=r"expected an \(N, H, W\) array"):
        pro(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"masks\[1\]: integer values must lie in \[0, 255\]"):
        pro([np.zeros((2, 2), int), np.full((3, 2), 256)], maps)
    with pytest.raises(ValueError, match="labels must be 0 .normal. or 1 .anomalous."):
        image_ap([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="labels and scores must be 1-D of equal length"):
        image_auroc([0, 1], [0.1, 0.2, 0.3])
    for limit in (0, 1.5):
        with pytest.raises(ValueError, match=r"fpr_limit must be in \(0, 1\]"):
            pro(masks, maps, fpr_limit=limit)


def brute_f1_max(labels, scores):
    """F1 at each distinct threshold by direct counting (an independent computation)."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp, fp, fn = (pred & labels).sum(), (pred & ~labels).sum(), (~pred & labels).sum()
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def test_f1_max_against_direct_counting_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(20):
        labels = rng.random(40) < 0.4
        labels[:2] = [0, 1]
        scores = np.round(rng.random(40) + 0.4 * labels, 1)  # rounded: many ties
        assert image_f1_max(labels, scores) == pytest.approx(brute_f1_max(labels, scores))
    maps = np.round(rng.random((3, 8, 8)), 2)
    masks = rng.random((3, 8, 8)) < 0.2
    assert pixel_f1_max(masks, maps) == pytest.approx(brute_f1_max(masks.ravel(), maps.ravel()))
    out = evaluate(maps, masks, [0, 1, 1], [0.1, 0.5, 0.3])
    assert out["pixel_f1_max"] == pytest.approx(brute_f1_max(masks.ravel(), maps.ravel()))
    assert image_f1_max([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == 1.0


def test_image_auroc_per_defect_type():
    maps, masks = np.zeros((6, 4, 4)), np.zeros((6, 4, 4), bool)
    masks[2:, 0, 0] = True
    defects = ["good", "good", "crack", "crack", "hole", "hole"]
    scores = [0.2, 0.4, 0.9, 0.8, 0.3, 0.1]  # cracks above every good image, holes mixed
    out = evaluate(maps, masks, [0, 0, 1, 1, 1, 1], scores, defects=defects)
    assert out["image_auroc_per_defect"] == {"crack": 1.0, "hole": pytest.approx(0.25)}
    assert out["image_auroc_per_defect"]["hole"] == image_auroc([0, 0, 1, 1], [0.2, 0.4, 0.3, 0.1])


def test_table_marks_unfinished_classes_and_compares_with_the_paper(tmp_path):
    import json
    for name, auroc in (("Class8", 0.98), ("Class10", 0.90), ("Class2", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
        if auroc is None:
            (tmp_path / name / "log.csv").write_text("step,loss\n1,0.5\n2,0.4\n")
            continue
        m = {k: 0.5 for _, k in COLUMNS}
        m.update(image_auroc=auroc, fps=10.0, train_seconds=120.0)
        (tmp_path / name / "metrics.json").write_text(json.dumps(m))
    md, text = table(tmp_path)
    lines = md.splitlines()
    assert [l.split(" | ")[0] for l in lines[2:]] == ["| Class2", "| Class8", "| Class10", "| mean of 2/3"]
    assert "unfinished (step 2)" in lines[2]
    assert "| 98.0 |" in lines[3] and "| 100.0 | -2.0 |" in lines[3]                # the paper's Class8
    assert lines[5].startswith("| mean of 2/3 | 94.0 | 50.0")
    assert text.splitlines()[0].startswith("Class,Image AUROC,Pixel AUROC,PRO,Image AP,Pixel AP,Image F1-max")


def test_table_compares_each_class_and_the_mean_with_the_paper(tmp_path):
    import json

    def runs_of(root, scores):
        for name, (auroc, pro) in scores.items():
            (root / name).mkdir(parents=True)
            (root / name / "config.json").write_text("{}")
            m = {k: 0.5 for _, k in COLUMNS}
            m.update(image_auroc=auroc, pixel_pro=pro, fps=1.0, train_seconds=60.0)
            (root / name / "metrics.json").write_text(json.dumps(m))
        return [line.split(" | ") for line in table(root)[0].splitlines()[2:]]

    visa = runs_of(tmp_path / "visa", {"pcb1": (0.95, 0.90), "candle": (0.90, 0.80)})
    assert visa[1][:1] == ["| pcb1"] and visa[1][-6:] == ["99.1", "-4.1", "98.5 (PatchCore)", "96.9", "-6.9",
                                                          "94.3 (PatchCore) |"]
    mean = visa[2]  # the paper's mean over candle and pcb1 (94.9, 99.1 and 94.7, 96.9), not its 12-class 97.8
    assert mean[0] == "| mean" and mean[-6:] == ["97.0", "-4.5", "-", "95.8", "-10.8", "- |"]
    all12 = runs_of(tmp_path / "all", {c: (0.9, 0.9) for c in PAPER["visa"] if c != "mean"})
    assert all12[-1][-6:] == ["97.8", "-7.8", "96.0 (RD4AD)", "93.2", "-3.2", "91.2 (PatchCore) |"]
    dagm = runs_of(tmp_path / "dagm", {"Class9": (0.99, None), "Class8": (0.97, None)})
    assert [r[0] for r in dagm] == ["| Class8", "| Class9", "| mean"]
    assert dagm[1][-3:] == ["96.1", "+2.9", "100.0 (CFA) |"] and dagm[2][-3:] == ["98.0", "+0.0", "- |"]
    assert "Paper PRO" not in table(tmp_path / "dagm")[0]  # DAGM: image AUROC only


def test_seeds_script_gives_mean_and_sample_std(tmp_path):
    import json
    import subprocess
    import sys
    for i, (auc, rel) in enumerate(((0.90, 0.05), (0.80, 0.01))):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "metrics.json").write_text(json.dumps(
            {"image_auroc": auc, "pixel_auroc": 0.5, "pixel_pro": None, "image_f1_max": 0.7, "train_seconds": 600,
             "reliance": {"image_auroc": rel, "pixel_auroc": 0.0, "pixel_pro": None},
             "restoration_psnr_good": {"100": 25.0, "200": 21.0 + i}}))
    out = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "scripts" / "seeds.py"),
                          f"full={tmp_path / 'r0'},{tmp_path / 'r1'}"], capture_output=True, text=True, check=True).stdout
    row = out.splitlines()[2].split(" | ")
    assert row[:3] == ["| full", "2", "85.0 ± 7.1"] and row[4] == "-"          # std with n - 1; no PRO: "-"
    assert row[6] == "3.0 ± 2.8" and row[9] == "t=100 25.0 ± 0.0, t=200 21.5 ± 0.7" and row[10] == "10.0 ± 0.0"
    assert row[11] == "- |"  # no FPS recorded
