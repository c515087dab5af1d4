"""predict: score your own images with a run's model (Alg. 2), decide with its stored threshold, write a CSV row and
an input | heatmap PNG per image; every readable file is scored, the unreadable ones listed at the end."""
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import data
import diffusionad
from extras.checkpoints import open_run
from extras.checks import or_exit
from extras.folders import list_images, load_image
from extras.inference import run_inference
from extras.reports import Progress, heatmap, save_png, to_uint8
from extras.thresholds import stored
from extras.speed import pick_device, precision as inference_precision


def open_model(args):
    """(path, state, cfg, opts, model in eval mode) of the run that predict/export/eval arguments name."""
    path, state, cfg, opts = open_run(args, diffusionad.Config, diffusionad.channel_mult)
    model = or_exit(diffusionad.build_model, cfg, state, cls=diffusionad.model_class(opts), opts=opts)
    return path, state, cfg, opts, model.eval()


def main(args):
    """predict: score images, decide with the stored threshold (or --threshold), write heatmaps."""
    files = or_exit(list_images, args.inputs)
    path, state, cfg, opts, model = open_model(args)
    device = pick_device(opts)
    model.to(device)
    threshold, source = stored(state, cfg, opts, path, args.threshold)
    precision, log = inference_precision(opts, device), sys.stdout if args.csv else sys.stderr
    if precision == "bf16" and not opts.amp:
        print("scoring in bf16, the run's default on this device; --no-amp: float32, as `export`", file=log)
    if isinstance(threshold, dict) and threshold.get("precision", precision) != precision:
        print(f"note: the threshold was set on {threshold['precision']} scores, these are {precision}: a score near "
              "it may fall the other way", file=log)
    threshold = threshold["value"] if isinstance(threshold, dict) else threshold
    predict(args, path, files, lambda x: run_inference(model, x, cfg, opts, device)[:2], cfg.img_size, threshold,
            source, state.get("aspects"))


def predict_outputs(args, path):
    """predict's new heatmap folder (RUN/predictions-<date-time>[_k], or an empty --out) and its CSV stream."""
    stamp = path.parent / f"predictions-{time.strftime('%Y%m%d-%H%M%S')}"
    out, k = Path(args.out) if args.out else stamp, 1
    while not args.out and out.exists():  # a new default folder, even for two predictions within one second
        k += 1
        out = stamp.with_name(f"{stamp.name}_{k}")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty: pass a new folder, so that no earlier result is overwritten")
    if args.csv and Path(args.csv).exists():
        raise SystemExit(f"--csv {args.csv} exists: pass a new file name")
    out.mkdir(parents=True, exist_ok=True)
    return out, (open(args.csv, "w", newline="") if args.csv else sys.stdout)


def predict(args, path, files, score, img_size, threshold, source, trained=None):
    """Score files in chunks (any folder size fits in memory): score(images (N,3,S,S)) -> (maps, scores).
    Writes path,score,anomalous,heatmap rows (anomalous: score >= threshold, from `source`) and input | heatmap
    PNGs; unreadable files are listed at the end, images of an aspect the run was not trained on noted. trained:
    the (lowest, highest) width / height of the run's training images (checkpoints before it: the run's shape)."""
    out, stream = predict_outputs(args, path)
    writer = csv.writer(stream)
    writer.writerow(["path", "score", "anomalous", "heatmap"])
    bad, used, done, flagged, stretched = [], set(), 0, 0, []
    H, W = data.hw(img_size)
    lo, hi = trained or (W / H, W / H)
    log = sys.stdout if args.csv else sys.stderr  # the CSV on stdout keeps it clean
    progress = Progress(len(files), "images", 0.0, log)
    for i in range(0, len(files), 64):
        chunk, images = [], []
        for f in files[i: i + 64]:
            try:
                image = load_image(f, img_size)
                with Image.open(f) as im:  # the header alone: an aspect none of the training images had is stretched
                    w, h = im.size
            except (OSError, ValueError) as e:  # load_image's errors name the file
                bad.append(str(e) if isinstance(e, ValueError) or str(f) in str(e) else f"{f}: {e}")
                continue
            images.append(image)
            chunk.append(f)
            if not lo / 1.1 <= w / h <= hi * 1.1:
                stretched.append(f"{f.name} ({w} x {h})")
        if not chunk:
            continue
        maps, scores = score(torch.stack(images))
        for f, img, m, s in zip(chunk, images, maps, scores):
            png = out / (f"{f.stem}_map.png" if f.stem not in used else f"{f.parent.name}_{f.stem}_{len(used)}_map.png")
            used.add(f.stem)
            save_png(png, np.concatenate([to_uint8(img), heatmap(m)], axis=1))
            verdict = "" if threshold is None else int(s >= threshold)
            flagged += verdict == 1
            writer.writerow([str(f), f"{s:.6f}", verdict, str(png)])
        done += len(chunk)
        progress.update(min(i + 64, len(files)))
    if args.csv:
        stream.close()
        print(f"wrote scores of {done} images to {args.csv} and heatmaps to {out}")
    print(f"{flagged} of {done} images flagged as anomalous (score >= threshold {threshold:.6f}, {source})"
          if threshold is not None else f"no threshold: {source}; the anomalous column is empty",
          file=log)
    if stretched:
        seen = f"the training images' {lo:.2f}-{hi:.2f}" if trained else f"the run's {W / H:.2f}"
        print(f"note: {len(stretched)} of {done} images have an aspect (width / height) outside {seen}, e.g. "
              f"{stretched[0]}: stretched to the run's {W} x {H}; their scores are less reliable (train on images of "
              "their shape)",
              file=log)
    if bad:
        raise SystemExit(f"{len(bad)} of {len(files)} files could not be read and were skipped:\n  " + "\n  ".join(bad))
