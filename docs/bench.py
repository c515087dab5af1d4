"""Speed and memory, side by side in one process: `python diffusionad.py bench [flags]` (or this file).

The plain path (fp32, NCHW, a host sync every step, for-each Adam; for inference the authors' loop: one image
and one time step at a time, autograd on) against the shipped one with this command's --amp / --compile
(NHWC and fused Adam on CUDA, no per-step sync, padded fixed-shape inference batches), with peak memory; and
the synthesizer's DataLoader alone (--workers N). Every flag of `train` sets the model and the data.
"""
import argparse
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import diffusionad as D  # noqa: E402
import runs  # noqa: E402


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS so far (Linux: KiB)


def timed(fn, device, repeats=1):
    fn()  # warm-up (and compilation)
    runs.sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    runs.sync(device)
    return (time.perf_counter() - t0) / repeats


def bench_training(cfg, opts, device, train_size, train_steps, mem):
    tcfg = replace(cfg, img_size=train_size)
    runs.check(tcfg, opts, D.channel_mult)
    B = tcfg.batch_size
    x0 = torch.rand(B, 3, train_size, train_size, device=device)
    mask = (torch.rand(B, 1, train_size, train_size, device=device) > 0.9).float()
    print(f"training step, {train_size}x{train_size}, batch {B}, base {cfg.base_channels}, {device}:")
    for shipped in (False, True):
        o = opts if shipped else replace(opts, amp=False, compile=False)
        torch.manual_seed(cfg.seed)
        fmt = runs.memory_format(o, device) if shipped else torch.contiguous_format
        model = D.build_model(tcfg, device=device).train().to(memory_format=fmt)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=shipped and device.type == "cuda")
        if shipped and o.compile:
            runs.compile_networks(model)
        x = x0.contiguous(memory_format=fmt)

        def step():
            with runs.autocast(o, device):
                loss = model(x, mask, B // 2, torch.Generator().manual_seed(0), source=x)["total"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if not shipped:
                loss.item()  # the plain loop reads the loss back every step
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_s = timed(step, device, train_steps)
        n = sum(p.numel() for p in model.parameters()) / 1e6
        name = "plain (fp32, NCHW, .item() per step)" if not shipped else \
            f"shipped ({'bf16' if o.amp else 'fp32'}, {'NHWC' if fmt == torch.channels_last else 'NCHW'}" \
            f"{', compiled' if o.compile else ''}{', fused Adam' if device.type == 'cuda' else ''}, no per-step sync)"
        print(f"  {name}: {B / step_s:.3g} samples/s, {n:.1f}M params, {mem} {peak_memory_mb(device):.0f} MiB")
        model = opt = None  # free before the next model is built
    if opts.workers:
        trainset = runs.make_trainset(tcfg, opts)
        workers = opts.workers if opts.workers > 0 else min(8, (os.cpu_count() or 2) - 1)
        batches = data.run_batches(len(trainset), B, 0, 0, 40 + 2 * workers)
        loader = iter(torch.utils.data.DataLoader(trainset, batch_sampler=batches, num_workers=workers,
                                                  pin_memory=device.type == "cuda", prefetch_factor=4))
        for _ in range(2 * workers):  # workers started, queues filled
            next(loader)
        t0 = time.perf_counter()
        for _ in range(40):
            next(loader)
        rate = 40 * B / (time.perf_counter() - t0)
        print(f"  data loader alone ({opts.data}, {workers} workers, synthesizer included): {rate:.1f} images/s")


def bench_inference(cfg, opts, device, n_images, mem):
    model, ts = D.build_model(cfg, device=device).eval(), D.ints(cfg.eval_t)
    images = torch.rand(n_images, 3, cfg.img_size, cfg.img_size)
    noise = torch.randn(n_images, len(ts), 3, cfg.img_size, cfg.img_size, device=device)

    def naive():  # the authors' evaluation: one image and one time step at a time, autograd on, fp32
        for i in range(n_images):
            x = D.to_model(images[i: i + 1].to(device), cfg)
            m = torch.stack([model.anomaly_maps(x, (t,), noise[i, k: k + 1])[0] for k, t in enumerate(ts)]).mean(0)
            m.flatten(1).topk(cfg.top_k, dim=1).values.mean(1).item()
    print(f"inference, {cfg.img_size}x{cfg.img_size}, base {cfg.base_channels}, t = {cfg.eval_t}, {n_images} images, "
          f"{device}:")
    base_fps = None
    plain = replace(opts, amp=False, compile=False, log_every=1e9)
    paths = [("naive (1 image, time steps in turn, autograd on, fp32)", None),
             (f"shipped (batch {opts.eval_batch}, time steps batched, inference_mode, fp32)", plain)]
    if opts.amp or opts.compile:
        paths.append((f"shipped with{' bf16' if opts.amp else ''}{' compile' if opts.compile else ''}"
                      f"{' + CUDA graphs' if opts.compile and device.type == 'cuda' else ''}",
                      replace(opts, log_every=1e9)))
    for name, o in paths:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fn = naive if o is None else (lambda o=o: D.run_inference(model, images, cfg, o, device))
        fps = n_images / timed(fn, device)
        base_fps = base_fps or fps
        print(f"  {name}: {fps:.3g} images/s ({fps / base_fps:.2f}x), {mem} {peak_memory_mb(device):.0f} MiB")
    if opts.compile:
        print("  " + runs.compile_report())


def main(argv=None):
    p = argparse.ArgumentParser(prog="diffusionad.py bench", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    runs.add_flags(p, D.Config, runs.RunOptions)
    p.add_argument("--n-images", type=int, default=8, help="test images for the inference timing")
    p.add_argument("--train-size", type=int, default=128, help="image size for the training-step timing")
    p.add_argument("--train-steps", type=int, default=3, help="timed training steps per path")
    a = p.parse_args(argv)
    cfg, opts = runs.check(*runs.options_from(a, D.Config), D.channel_mult)
    device = runs.pick_device(opts)
    mem = "peak GPU memory" if device.type == "cuda" else "process peak RSS so far"
    bench_training(cfg, opts, device, a.train_size, a.train_steps, mem)
    bench_inference(cfg, opts, device, a.n_images, mem)


if __name__ == "__main__":
    main()
