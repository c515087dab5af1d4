"""Does the restoration remove the real defects? A diagnostic of noise-to-norm on a model's test split.

python scripts/restoration_check.py RUN/ckpt.pt [--t 100,200,400] [--changed 0.5]
Restores every anomalous test image in one step (Alg. 2's noise) at each t and reports, over the pixels
inside the defect masks and over the normal pixels of the same images: the mean |x0_hat - x0| (channel
mean, [0, 1] images) and the fraction of pixels that the restoration changed by more than --changed
(for binarised images: turned into the other material). Noise-to-norm needs the first fraction high and
the second low. Never used to pick anything.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffusionad  # noqa: E402
from extras.checkpoints import load_checkpoint  # noqa: E402
from extras.checks import open_test  # noqa: E402
from extras.inference import inference_noise  # noqa: E402
from extras.options import ints  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--t", default="100,200,400")
    p.add_argument("--changed", type=float, default=0.5)
    args = p.parse_args()
    model, cfg = diffusionad.load(args.ckpt)
    opts = load_checkpoint(args.ckpt, diffusionad.Config)[2]
    test = open_test(None, opts, cfg.img_size)
    items = [it for it in (test[i] for i in range(len(test))) if it["label"] == 1 and it.get("has_mask", True)]
    images = torch.stack([it["image"] for it in items])
    masks = torch.stack([it["mask"][0] for it in items]) > 0
    eps = inference_noise(cfg.seed, 1, cfg.img_size)  # one draw, the same at every t
    for t in ints(args.t):
        diffs = []
        with torch.inference_mode():
            for i in range(0, len(images), opts.eval_batch):
                x0 = images[i: i + opts.eval_batch]
                x0_hat = model.restore(x0, torch.full((len(x0),), t), eps.expand(len(x0), -1, -1, -1))
                diffs.append((x0_hat.clamp(0, 1) - x0).abs().mean(1))
        d = torch.cat(diffs)
        inside, outside = d[masks], d[~masks]
        print(f"t={t:4d}: defect pixels |x0_hat - x0| {inside.mean():.3f}, changed > {args.changed}: "
              f"{100 * (inside > args.changed).float().mean():.1f} %;  normal pixels {outside.mean():.3f}, "
              f"{100 * (outside > args.changed).float().mean():.2f} %  ({len(items)} anomalous images)", flush=True)


if __name__ == "__main__":
    main()
