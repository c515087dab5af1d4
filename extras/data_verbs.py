"""Two commands to look at and carry data: `preview` draws what the synthesizer makes of a data set (the paper's
Fig. 4: N | A | M | S rows), `resize` copies a class folder at the size the loader would resize it to (a small copy
to carry to a GPU machine that loads to the same pixels)."""
from pathlib import Path

import numpy as np
from PIL import Image

import data
from extras.anomalies import FILL, SHAPE, foreground
from extras.checks import or_exit
from extras.folders import open_data
from extras.options import show


def preview(args):
    """python diffusionad.py preview --data PATH --out grid.png: rows of N | A | M | S (M: white = the anomaly mask,
    grey = the foreground)."""
    normal = or_exit(open_data, args.data, "train", args.img_size)
    kind, fg = or_exit(foreground, normal, args.foreground, args.img_size)
    textures = sorted(p for p in Path(args.texture_dir).rglob("*") if p.suffix.lower() in data.IMG_EXTS) \
        if args.texture_dir else []
    ts = data.TrainSet(normal, args.seed, fg, textures, kind == "texture", SHAPE[args.shape], FILL[args.fill])
    idx = np.random.default_rng(args.seed).choice(len(ts), min(args.n, len(ts)), replace=False)
    gap, rows = np.ones((data.hw(args.img_size)[0], 4, 3), np.float32), []
    for i in idx:
        s = ts.sample(int(i))
        m = np.repeat((0.3 * s["foreground"] + 0.7 * s["mask"])[..., None], 3, axis=2)
        row = [s["image"], gap, s["anomaly"], gap, m, gap, s["synthetic"]]
        rows += [np.concatenate(row, axis=1), np.ones((4, row[0].shape[1] * 4 + 12, 3), np.float32)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(data.to_u8(np.concatenate(rows[:-1]))).save(args.out)
    print(f"wrote {args.out}: {len(idx)} rows of N | A | M | S, foreground '{kind}'")


def resize(args):
    """python diffusionad.py resize --data ROOT/CLASS --out NEW --img-size S|H,W: loading the copy at that size gives
    the pixels of loading the original: images resized as data.rgb does and stored losslessly (PNG, same stem),
    ground-truth masks as data.defect_mask does, foreground masks binarised; other files copied."""
    src, dst, size = Path(args.data), Path(args.out), args.img_size
    layout = data.open_layout(src) if src.is_dir() else None
    if layout not in ("mvtec", "visa-1cls", "dagm"):
        raise SystemExit(f"resize: {src} is not an MVTec AD, VisA 1cls or DAGM class folder"
                         + (" (a raw VisA release names its files in a CSV: prepare it as 1cls first)" if layout else ""))
    if dst.exists():
        raise SystemExit(f"resize: {dst} exists; pass a new --out")
    masks = {Path(m) for split in ("train", "test") for _, m, _, _ in data.open_dataset(src, split, size).records if m}
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix.lower() not in data.IMG_EXTS:
            out.write_bytes(f.read_bytes())
            continue
        im = data.open_image(f)
        if f in masks or f.parent.name == "foreground" or "ground_truth" in f.parts:
            a = data.defect_mask(im, size)[0] if f in masks else data.nearest(data.nonzero(im), size).astype(np.float32)
            im = Image.fromarray((a * 255).astype(np.uint8))
        else:
            a = data.rgb(im, size)
            grey = im.mode in ("1", "L", "LA", "I", "F") or im.mode.startswith("I;16")
            im = Image.fromarray(data.to_u8(a[..., 0] if grey else a))
        im.save(out if f.suffix.lower() == ".png" else out.with_suffix(".png"), format="PNG")
    print(f"wrote {dst}: {layout} layout at {show(size)} px")
