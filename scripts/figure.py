"""Compose docs/results.png from `diffusionad.py eval --save-maps` panels (input | restoration | map | truth).

python scripts/figure.py docs/results.png runs/mt-full/eval_ckpt_magnetic_tile_t100+200 ...
(each argument: a folder of panels written by `eval --save-maps`). Per folder: one image of each defect
type (at most 5; three for a single type) and one good image, in file-name order (no picking).
"""
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw

H, LABEL = 96, 170


def picks(folder):
    files = sorted(Path(folder).glob("*.png"))
    if not files:
        raise SystemExit(f"{folder} has no panels: run `python diffusionad.py eval --run RUN --save-maps`")
    kinds = sorted({f.stem.split("_")[0] for f in files} - {"good"})
    firsts = [next(f for f in files if f.name.startswith(k + "_")) for k in kinds]
    if len(firsts) == 1:  # one defect type (DAGM): show three of it
        firsts = [f for f in files if f.name.startswith(kinds[0] + "_")][:3]
    return firsts[:5] + [f for f in files if f.name.startswith("good_")][:1]


def main(out, runs):
    rows = []
    for run in runs:
        for f in picks(run):
            im = Image.open(f).convert("RGB")
            im = im.resize((im.width * H // im.height, H), Image.NEAREST)
            row = Image.new("RGB", (im.width + LABEL, H), "white")
            row.paste(im, (LABEL, 0))
            step = re.match(r"eval_ckpt_(\d+)_", Path(run).name)  # panels of a kept checkpoint: say which
            name = Path(run).parent.name + (f"@{step[1]}" if step else "")
            ImageDraw.Draw(row).text((4, H // 2 - 6), f"{name}: {f.stem}"[:27], fill="black")
            rows.append(row)
    fig = Image.new("RGB", (max(r.width for r in rows), H * len(rows) + 16), "white")
    ImageDraw.Draw(fig).text((LABEL + 4, 2), "input | restoration (first t) | anomaly map | ground truth", fill="black")
    for i, r in enumerate(rows):
        fig.paste(r, (0, 16 + i * H))
    fig.save(out, optimize=True)
    print(out, fig.size)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
