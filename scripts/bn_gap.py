"""The segmentation net's BatchNorm train/eval gap, measured on the model's own training task.

python scripts/bn_gap.py RUN/ckpt.pt [--batches 20]
Draws fresh synthetic anomalies on training images (an epoch the run never saw), restores them at the
inference time steps (Alg. 2) and scores the maps against the synthetic masks with the seg net's
BatchNorm (a) in eval mode with the running statistics from training, (b) recalibrated on inference-like
inputs (recalibrate_bn below, other images), (c) in training mode (each batch's own statistics).
Prints pixel AUROC / image AUROC (normal vs synthetic) for each, and the first BatchNorm's running
variance next to the variance of its input at inference.
"""
import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import diffusionad  # noqa: E402
import metrics  # noqa: E402
from extras.anomalies import random_crops, trainset as make_trainset  # noqa: E402
from extras.checkpoints import load_checkpoint  # noqa: E402
from extras.folders import holdout_split, open_data  # noqa: E402


def recalibrate_bn(model, cfg, opts, trainset, n_batches):
    """(b): re-estimate the seg net's BatchNorm statistics on inference-like inputs: training batches (the run's
    training images, never its held-out slice), normal and synthetic, restored at the inference time steps
    (training sees t up to T). Formerly `eval --bn-recal`, measured in docs/RESULTS.md and removed."""
    bns = [m for m in model.seg.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    ts, g = cfg.eval_t, torch.Generator().manual_seed(cfg.seed + 7)
    epoch = 10 ** 6  # synthetic anomalies that training never saw
    batches = [data.step_keys(b, epoch) for b in data.epoch_batches(len(trainset), cfg.batch_size, cfg.seed, epoch)]
    model.eval()
    model.seg.train()
    with torch.no_grad():
        for batch in torch.utils.data.DataLoader(trainset, batch_sampler=batches[:n_batches]):
            x0 = batch["image"]
            if opts.crop:
                x0, _ = random_crops(x0, torch.zeros_like(x0[:, :1]), opts.crop, g)
            x0_hat = x0
            if model.denoiser is not None:
                t = torch.tensor(ts)[torch.randint(len(ts), (len(x0),), generator=g)]
                x0_hat = model.restore(x0, t, torch.randn(x0.shape, generator=g))
            model.segment(x0, x0_hat)
    for m in bns:
        m.momentum = 0.1
    model.eval()


def maps_on(model, batches, cfg, ts, bn_train):
    g = torch.Generator().manual_seed(123)
    maps, masks, scores = [], [], []
    model.eval()
    if bn_train:
        model.seg.train()
    with torch.no_grad():
        for x0, mask in batches:
            noise = torch.randn((len(ts), *x0.shape[1:]), generator=g)
            m, s, _ = model.anomaly_maps(x0, ts, noise)
            maps.append(m.numpy()), masks.append(mask[:, 0].numpy()), scores.append(s.numpy())
    maps, masks, scores = np.concatenate(maps), np.concatenate(masks), np.concatenate(scores)
    labels = masks.reshape(len(masks), -1).any(1).astype(int)
    return metrics.pixel_auroc(masks, maps), metrics.image_auroc(labels, scores)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--batches", type=int, default=20)
    args = ap.parse_args()
    state, cfg, opts = load_checkpoint(args.ckpt, diffusionad.Config)
    model = diffusionad.load(args.ckpt)[0]
    normal = holdout_split(open_data(opts.data, "train", cfg.img_size), opts.holdout)[0]  # not the held-out slice
    trainset = make_trainset(normal, cfg, opts)
    ts = cfg.eval_t
    epoch = 10 ** 6 + 1  # neither training nor recalibrate_bn uses this epoch
    keys = data.epoch_batches(len(trainset), cfg.batch_size, cfg.seed, epoch)[:args.batches]
    batches = []
    for b in torch.utils.data.DataLoader(trainset, batch_sampler=[data.step_keys(k, epoch) for k in keys]):
        batches.append((b["image"], b["mask"]))
    bn = next(m for m in model.seg.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():  # the first BatchNorm's input at inference: conv1 of cat(x0, x0_hat) at ts
        x0 = torch.cat([x for x, _ in batches])[:24]
        x0k = x0.repeat(len(ts), 1, 1, 1)
        t = torch.tensor(ts).repeat_interleave(len(x0))
        x0_hat = x0k if model.denoiser is None else \
            model.restore(x0k, t, torch.randn(x0k.shape, generator=torch.Generator().manual_seed(5)))
        feat = model.seg.enc[0][0](x0k if model.denoiser is None else torch.cat([x0k, x0_hat], 1))
    print(f"{args.ckpt} (step {state['step']}): first BatchNorm running var mean {bn.running_var.mean():.4f}, "
          f"its input's variance at t={cfg.eval_t}: {feat.var((0, 2, 3)).mean():.4f}")
    rows = [("eval mode, training statistics", maps_on(model, batches, cfg, ts, False))]
    recal = copy.deepcopy(model)
    recalibrate_bn(recal, cfg, opts, trainset, 50)
    rows.append(("eval mode, recalibrated (50 batches)", maps_on(recal, batches, cfg, ts, False)))
    rows.append(("train mode, batch statistics", maps_on(copy.deepcopy(model), batches, cfg, ts, True)))
    for name, (p, i) in rows:
        print(f"  {name:<38} pixel AUROC {100 * p:.1f}  image AUROC {100 * i:.1f}")


if __name__ == "__main__":
    main()
