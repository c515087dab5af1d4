"""How a trained model treats its own normal TRAINING images (no test image involved).

python scripts/train_check.py RUN/ckpt.pt [DATA] [--n 12]
Takes n training images spread over the training split, runs Alg. 2 on them whole (the inference time
steps, seeded noise) and on their central crop of the training crop size (when the run used --crop),
and prints the mean image score (top-K) and mean map value, and the restorations' colour bias: the
mean of x0_hat - x0 per channel at each time step (grey data: any colour is the denoiser's error).
A model that scores its own normal images high is broken, whatever the test set says.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffusionad  # noqa: E402
from extras.checkpoints import load_checkpoint  # noqa: E402
from extras.folders import open_data  # noqa: E402
from extras.inference import inference_noise  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("data", nargs="?", default=None, help="dataset folder, if not the one the run recorded")
    p.add_argument("--n", type=int, default=12)
    args = p.parse_args()
    model, cfg = diffusionad.load(args.ckpt)
    opts = load_checkpoint(args.ckpt, diffusionad.Config)[2]
    train = open_data(args.data or opts.data, "train", cfg.img_size)
    idx = [round(i * (len(train) - 1) / max(args.n - 1, 1)) for i in range(min(args.n, len(train)))]
    x0 = torch.stack([train[i]["image"] for i in idx])  # (n,3,H,W)
    ts = cfg.eval_t
    noise = inference_noise(cfg.seed, len(ts), cfg.img_size)  # Alg. 2's noise, (K,3,H,W)
    with torch.no_grad():
        maps, scores, x0_hat = model.anomaly_maps(x0, ts, noise)
        print(f"{args.ckpt}: {len(x0)} training images, whole: mean score {scores.mean():.3f}, mean map {maps.mean():.3f}")
        if opts.crop:
            c, lo = opts.crop, (cfg.img_size - opts.crop) // 2
            cm, cs, _ = model.anomaly_maps(x0[..., lo:lo + c, lo:lo + c], ts, noise[..., lo:lo + c, lo:lo + c])
            print(f"  central {c}-px crops: mean score {cs.mean():.3f}, mean map {cm.mean():.3f}")
        if model.denoiser is not None:
            bias = (x0_hat - x0[None]).reshape(len(x0_hat), len(x0), 3, -1).mean((1, 3))  # (K,3)
            for t, b in zip(ts, bias.tolist()):
                print(f"  t={t}: mean(x0_hat - x0) per channel " + " ".join(f"{v:+.3f}" for v in b))


if __name__ == "__main__":
    main()
