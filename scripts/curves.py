"""The README's training curves: test metrics of the checkpoints a run kept (`--keep-ckpts`) and of its
final model, mean +- standard deviation over seeds. A curve to report, never a way to pick a model.

python scripts/curves.py OUT.png full=runs/mt-full-s0,runs/mt-full-s1 seg-only=runs/mt-seg-s0,runs/mt-seg-s1
Reads RUN/eval_ckpt_<step>_*.json and RUN/eval_ckpt_*.json (written by `diffusionad.py eval`); prints
the numbers and draws image AUROC, PRO and restoration PSNR (t = 100) against the training step.
"""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plot import chart  # noqa: E402


def points(run):
    """{step: metrics} of one run's evaluations (one file per checkpoint, the latest written wins)."""
    out = {}
    for f in sorted(Path(run).glob("eval_ckpt_*.json"), key=lambda p: p.stat().st_mtime):
        if not f.stem.endswith("_t100+200"):  # another option (_amp, _bnrecalN): not this curve
            continue
        m = json.loads(f.read_text())
        if m.get("eval_t") == [100, 200]:
            out[m["steps"]] = m
    return out


def main(path, groups):
    keys = (("image AUROC", lambda m: 100 * m["image_auroc"]), ("PRO", lambda m: 100 * m["pixel_pro"]),
            ("PSNR t=100 (dB)", lambda m: m.get("restoration_psnr_good", {}).get("100", float("nan"))))
    series = {k: {} for k, _ in keys}
    for label, runs in groups:
        per_run = [points(r) for r in runs]
        steps = sorted(set.intersection(*(set(p) for p in per_run)))
        for name, get in keys:
            vals = np.array([[get(p[s]) for s in steps] for p in per_run])
            if np.isnan(vals).all():
                continue
            mean, sd = vals.mean(0), vals.std(0, ddof=1) if len(runs) > 1 else np.zeros(len(steps))
            series[name][f"{label} (n={len(runs)})"] = (steps, mean.tolist(), sd.tolist())
            print(f"{label:12s} {name:16s} " + "  ".join(f"{s}: {m:.1f}+-{d:.1f}" for s, m, d in zip(steps, mean, sd)))
    tiles = []
    for i, (name, s) in enumerate(series.items()):
        tile = Path(path).with_name(f".{Path(path).stem}_{i}.png")
        chart(s, name, "training step", "", tile, size=(420, 300))
        tiles.append(Image.open(tile).convert("RGB"))
        tile.unlink()
    fig = Image.new("RGB", (sum(t.width for t in tiles), tiles[0].height), "white")
    for i, t in enumerate(tiles):
        fig.paste(t, (sum(u.width for u in tiles[:i]), 0))
    fig.save(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], [(a.split("=")[0], a.split("=")[1].split(",")) for a in sys.argv[2:]])
