"""Does a model find synthetic defects drawn at the images' native size and resized like them as well as
those drawn at the training size? Normal training images only, no test image.

python scripts/resize_check.py RUN/ckpt.pt [--n 20] [--native 640]
Takes n of the run's held-out normal images (the held-out slice; with --holdout 0, training images) at
their native size, draws the run's synthetic anomaly (--anomaly-shape/--anomaly-fill, seeded) either on
the image resized to the training size, or on the native image before resizing it (as a real defect is
resized by the loader), and prints pixel AUROC, PRO and the mean map inside the anomalies for each. A
model that finds the first and misses the second has learned how synthetic anomalies are drawn.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import diffusionad  # noqa: E402
import metrics  # noqa: E402
from extras.anomalies import FILL, SHAPE  # noqa: E402
from extras.checkpoints import load_checkpoint  # noqa: E402
from extras.folders import holdout_split, open_data  # noqa: E402
from extras.inference import inference_noise  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--native", type=int, default=640, help="the images' native side")
    args = p.parse_args()
    opts = load_checkpoint(args.ckpt, diffusionad.Config)[2]
    model, cfg = diffusionad.load(args.ckpt)
    train, held = holdout_split(open_data(opts.data, "train", args.native), opts.holdout)
    images, S, ts = held or train, cfg.img_size, cfg.eval_t
    eps = inference_noise(cfg.seed, len(ts), S)
    shape, fill = SHAPE[opts.anomaly_shape], FILL[opts.anomaly_fill]
    for where in ("drawn at the training size", f"drawn at {args.native} px, resized"):
        maps, masks = [], []
        for j in range(min(args.n, len(images))):
            rng, native = np.random.default_rng((7, j)), images[j]["image"].numpy().transpose(1, 2, 0)
            if where.startswith("drawn at the"):
                x, M = data.synthesize(data.rgb(Image.fromarray(data.to_u8(native)), S), None, rng, shape=shape,
                                       fill=fill)
            else:
                xn, Mn = data.synthesize(native, None, rng, shape=shape, fill=fill)
                x = data.rgb(Image.fromarray(data.to_u8(xn)), S)
                M = data.defect_mask(Image.fromarray((Mn * 255).astype(np.uint8)), S)[0]
            with torch.no_grad():
                m, _, _ = model.anomaly_maps(torch.from_numpy(x.transpose(2, 0, 1).copy())[None], ts, eps)
            maps.append(m[0].numpy())
            masks.append(M)
        inside = np.mean([m[k > 0].mean() for m, k in zip(maps, masks)])
        print(f"{where:32s} pixel AUROC {100 * metrics.pixel_auroc(masks, maps):5.1f}  "
              f"PRO {100 * metrics.pro(masks, maps):5.1f}  mean map inside the anomalies {inside:.3f}")


if __name__ == "__main__":
    main()
