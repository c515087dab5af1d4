"""What an evaluation reports and writes: the decision threshold and the verdicts it gives, the reliance on the
restoration, the restorations' PSNR, the console summary, metrics.json and the eval file names, map panels, progress
lines with one ETA, and the note before a slow CPU run."""
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
import metrics
from extras.checkpoints import atomic_write, settings
from extras.speed import autocast, inference_bf16, memory_format
from extras.thresholds import verdicts

COLUMNS = (("Image AUROC", "image_auroc"), ("Pixel AUROC", "pixel_auroc"), ("PRO", "pixel_pro"),
           ("Image AP", "image_ap"), ("Pixel AP", "pixel_ap"), ("Image F1-max", "image_f1_max"),
           ("Pixel F1-max", "pixel_f1_max"))


def duration(seconds):
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def eta(done, total, seconds):
    """'eta 5m19s': the time left for total - done items at the rate of `done` items in `seconds`."""
    return f"eta {duration((total - done) * seconds / max(done, 1e-9))}"


class Progress:
    """A line with the rate and the ETA every `every` seconds: `  480/1150 test images, 2.1/s, eta 5m19s`."""
    def __init__(self, total, what, every, stream=None):
        self.total, self.what, self.every, self.stream = total, what, every, stream
        self.t0 = self.t_print = time.time()

    def update(self, done):
        now = time.time()
        if now - self.t_print >= self.every and done < self.total:
            self.t_print = now
            rate, left = done / (now - self.t0), eta(done, self.total, now - self.t0)
            print(f"  {done}/{self.total} {self.what}, {rate:.1f}/s, {left}", file=self.stream or sys.stdout, flush=True)


def read_split(test):
    """Every item of a test split read: (items, images (N,3,H,W), masks (N,H,W), labels (N,), has_mask (N,): False for
    an anomalous image without a mask)."""
    items = [test[i] for i in range(len(test))]
    kept = sum(it.get("regions_kept", 0) for it in items)
    if kept:
        print(f"  {kept} defect region(s) smaller than a pixel at the image size kept as one pixel each")
    return (items, torch.stack([it["image"] for it in items]), np.stack([it["mask"][0].numpy() for it in items]),
            np.array([it["label"] for it in items]), np.array([it.get("has_mask", True) for it in items]))


def maps_without_restoration(model, images, opts, device):
    """The segmentation net's maps (N,H,W) and scores (N,) with x0_hat := x0: what it finds in x0 alone. One
    segmentation pass per batch."""
    fmt, out = memory_format(opts, device, inference=True), []
    with torch.inference_mode(), autocast(opts, device, inference=True):
        for i in range(0, len(images), opts.eval_batch):
            x0 = images[i: i + opts.eval_batch].to(device).contiguous(memory_format=fmt)
            out.append(torch.sigmoid(model.segment(x0, x0).float())[:, 0].cpu())  # float32, as Alg. 2's maps
    maps = torch.cat(out)
    return maps.numpy(), model.image_score(maps).numpy()


def add_reliance(res, model, images, masks, labels, has_mask, opts, device):
    """The segmentation net's reliance on the restoration, which every evaluation of a model with both networks
    reports: how much image AUROC, pixel AUROC and PRO drop when x0_hat is replaced by x0 itself."""
    plain_maps, plain_scores = maps_without_restoration(model, images, opts, device)
    res["without_restoration"] = plain = metrics.evaluate(plain_maps, masks, labels, plain_scores, pixel_images=has_mask)
    res["reliance"] = {k: None if res[k] is None else res[k] - plain[k] for k in ("image_auroc", "pixel_auroc", "pixel_pro")}


def psnr(mse, labels, steps):
    """PSNR (dB) of the good images' restorations per time step: mse (N,K), labels (N,); None without good images."""
    if not (labels == 0).any():
        return None
    values = -10 * np.log10(np.maximum(mse[labels == 0], 1e-10)).mean(0)
    return {str(t): round(float(p), 2) for t, p in zip(steps, values)}


def report(res, items, scores, threshold, cfg, opts, device):
    """Adds the counts and the threshold's verdicts to an evaluation's results and prints them."""
    labels, has_mask = np.array([it["label"] for it in items]), np.array([it.get("has_mask", True) for it in items])
    res.update(n_test_good=int((labels == 0).sum()), n_test_anomalous=int((labels == 1).sum()),
               n_test_without_mask=int((~has_mask).sum()), regions_kept=sum(it.get("regions_kept", 0) for it in items))
    if threshold is not None:
        res["flagged"] = verdicts(threshold, np.asarray(scores), labels, res.get("image_f1_max"))
    if res.get("restoration_psnr_good", 0) is None:
        del res["restoration_psnr_good"]
    print_metrics(res, cfg, opts, device)


def print_metrics(res, cfg, opts, device):
    """The console report of an evaluation (metrics.json holds the same numbers)."""
    ts = ",".join(map(str, cfg.eval_t))
    print(f"{res['data']} (t = {ts}, {res['n_test_good'] + res['n_test_anomalous']} test images: "
          f"{res['n_test_good']} good, {res['n_test_anomalous']} anomalous)")
    cols = [(name, k) for name, k in COLUMNS if res.get(k) is not None]
    print("  " + "  ".join(name for name, _ in cols) + "    FPS")
    print("  " + "  ".join(f"{100 * res[k]:>{len(name)}.1f}" for name, k in cols) + f"  {res['fps']:>5.1f}")
    if res.get("pixel_auroc") is None:
        print("  no masks for the anomalous test images: image metrics only")
    elif res.get("n_test_without_mask"):
        print(f"  pixel metrics and PRO over the {res['n_test_anomalous'] - res['n_test_without_mask']} anomalous "
              f"images with a mask (and the good ones); {res['n_test_without_mask']} have none")
    print(f"  FPS = test images/s through both networks at all time steps incl. the top-{cfg.top_k} score, "
          f"batch {opts.eval_batch} on {device} in {res['precision']}, after a warm-up, file reading excluded. "
          "F1 = F1-max")
    if "reliance" in res:
        print("  reliance on the restoration (drop with x0_hat := x0): " + ", ".join(
            f"{name} {100 * v:+.1f}" for name, v in zip(("image AUROC", "pixel AUROC", "PRO"), res["reliance"].values())
            if v is not None))
    if "restoration_psnr_good" in res:
        print("  restoration PSNR of the good test images (dB): "
              + ", ".join(f"{'t=' * t.isdigit()}{t} {p:.1f}" for t, p in res["restoration_psnr_good"].items()))
    if "flagged" in res:
        f, f1 = res["flagged"], lambda v: "-" if v is None else f"{100 * v:.1f}"
        print(f"  the stored threshold {f['threshold']:.4f} ({f['rule']} rule) flags {percent(f['good'])} of the good and "
              f"{percent(f['anomalous'])} of the anomalous test images: image F1 {f1(f['f1'])} (F1-max "
              f"{f1(f['image_f1_max'])})")
        for rule, v in f["by_rule"].items():
            if rule != f["rule"]:
                print(f"  the {rule} rule's threshold {v['threshold']:.4f} would flag {percent(v['good'])} and "
                      f"{percent(v['anomalous'])}: image F1 {f1(v['f1'])}")


def percent(v):
    return "-" if v is None else f"{100 * v:.1f} %"


def write_metrics(path, res, cfg, opts):
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in res.items()}
    clean["config"] = settings(cfg, opts)
    atomic_write(path, json.dumps(clean, indent=2))
    print(f"  wrote {path}")


def save_panels(folder, items, images, restored, maps, t):
    folder.mkdir(parents=True, exist_ok=True)
    for it, img, rec, m in zip(items, images, restored, maps):
        panel = [to_uint8(img), to_uint8(rec), heatmap(m), to_uint8(it["mask"].expand(3, -1, -1))]
        save_png(folder / f"{it['defect']}_{Path(it['path']).stem}.png", np.concatenate(panel, axis=1))
    print(f"  wrote {len(items)} panels (input | restoration at t={t} | map | ground truth) to {folder}")


def eval_output(args, opts, cfg, path, device):
    """Where an evaluation writes: RUN/eval_<checkpoint>_<data>_t<t>[_alg2][_amp (bf16)].json, or --json; never a
    run's own metrics.json, never an existing file given with --json. Also the folder name for its panels."""
    data_name = Path((args.test or args.data or opts.test or opts.data).rstrip("/")).name
    parts = ["eval", path.stem, data_name, "t" + "+".join(map(str, cfg.eval_t))]
    parts += [p for p, on in (("alg2", getattr(args, "alg2", False)), ("amp", inference_bf16(opts, device))) if on]
    name = "_".join(parts)
    out = Path(args.json) if args.json else path.parent / f"{name}.json"
    if out.name == "metrics.json" or (args.json and out.exists()):
        raise SystemExit(f"--json {out}: {'a run’s own result' if out.name == 'metrics.json' else 'exists'}; "
                         "pass a new file name")
    return out, path.parent / name


def to_uint8(x):
    """(3,H,W) tensor in [0, 1] -> (H,W,3) uint8."""
    return data.to_u8(x.permute(1, 2, 0).numpy())


def heatmap(m):
    """(H,W) map in [0, 1] -> (H,W,3) uint8, blue (normal) to red (anomalous): a jet-like colour scale."""
    v = np.clip(m, 0, 1)[..., None]
    return data.to_u8(np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1))


def save_png(path, array):
    Image.fromarray(array).save(path)


def cpu_note(model, cfg, opts, device, steps, min_params=20e6):
    """On a CPU, a model of the paper's size (min_params or more) is timed on one step of two images (a copy, random
    images) and the user told how long the run would take and how to train on this machine. Returns the note."""
    n_params = sum(p.numel() for p in model.parameters())
    if device.type != "cpu" or n_params < min_params:
        return None
    (H, W), g = data.hw(opts.crop or cfg.img_size), torch.Generator().manual_seed(0)
    x0, mask, probe = torch.rand(2, 3, H, W, generator=g), torch.zeros(2, 1, H, W), copy.deepcopy(model)
    t0 = time.time()
    probe.train_loss(x0, mask, torch.tensor([0, 1]), torch.randn_like(x0))["total"].backward()
    passes = 2 if opts.variant == "authors" else 1  # the variant runs the denoiser twice per image
    seconds = (time.time() - t0) * cfg.batch_size / 2 * passes
    return (f"note: a {n_params / 1e6:.0f}M-parameter model on a CPU: one step takes about {seconds:.0f} s, so "
            f"{steps} steps would take about {duration(seconds * steps)}. To train on this machine, add --preset cpu "
            "(a 2.5M-parameter model, minutes). Continuing as asked.")
