"""bench: the speed and memory of the training step and of Alg. 2, the plain path (fp32, NCHW, a host sync every step;
for inference the authors' loop: one image and one time step at a time, autograd on) against the shipped one with the
command's --amp / --compile (NHWC and fused Adam on CUDA, no per-step sync, padded fixed-shape inference batches, the
time steps in one batch), side by side in one process; and the synthesizer's DataLoader."""
import os
import resource
import time
from dataclasses import replace

import torch

import data
import diffusionad
from extras.anomalies import trainset
from extras.checks import or_exit
from extras.folders import open_data
from extras.inference import run_inference
from extras.options import check_flags, from_flags
from extras.speed import compile_report, inference_bf16, memory_format, pick_device, sync, training_forward


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS so far (Linux: KiB)


def timed(fn, device, repeats=1):
    fn()  # warm-up (and compilation)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeats


def bench_training(cfg, opts, device, train_size, train_steps, mem):
    """The training step (diffusionad.train_step, the one the training loop runs) plain and shipped."""
    tcfg = check_flags(replace(cfg, img_size=train_size), opts, diffusionad.channel_mult)[0]
    B, cls = tcfg.batch_size, diffusionad.model_class(opts)
    x0 = torch.rand(B, 3, train_size, train_size, device=device)
    mask = (torch.rand(B, 1, train_size, train_size, device=device) > 0.9).float()
    label = torch.tensor([0] * (B // 2) + [1] * (B - B // 2))  # a batch's normal half, then its synthetic half
    print(f"training step, {train_size}x{train_size}, batch {B}, base {cfg.base_channels}, {device}:")
    for shipped in (False, True):
        o = opts if shipped else replace(opts, amp=False, compile=False)
        torch.manual_seed(cfg.seed)
        fmt = memory_format(o, device) if shipped else torch.contiguous_format
        model = diffusionad.build_model(tcfg, device=device, cls=cls, opts=opts).train().to(memory_format=fmt)
        opt = torch.optim.Adam(model.param_groups(), lr=cfg.lr, fused=shipped and device.type == "cuda")
        forward = training_forward(model, o, device, 1) if shipped else model
        x = x0.contiguous(memory_format=fmt)
        inputs = model.draw(x, mask, x, label, torch.Generator().manual_seed(0), tcfg.timesteps)

        def step():
            loss = diffusionad.train_step(forward, opt, inputs, o, device)
            if not shipped:
                loss["total"].item()  # the plain loop reads the loss back every step
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_s = timed(step, device, train_steps)
        n = sum(p.numel() for p in model.parameters()) / 1e6
        name = "plain (fp32, NCHW, .item() per step)" if not shipped else \
            f"shipped ({'bf16' if o.amp else 'fp32'}, {'NHWC' if fmt == torch.channels_last else 'NCHW'}" \
            f"{', compiled' if o.compile else ''}{', fused Adam' if device.type == 'cuda' else ''}, no per-step sync)"
        print(f"  {name}: {B / step_s:.3g} samples/s, {n:.1f}M params, {mem} {peak_memory_mb(device):.0f} MiB")
        model = opt = forward = None  # free before the next model is built
    if opts.workers:
        bench_loader(tcfg, opts, device)


def bench_loader(cfg, opts, device):
    """The synthesizer's DataLoader alone: images per second once its workers run."""
    train = or_exit(trainset, or_exit(open_data, opts.data, "train", cfg.img_size), cfg, opts)
    workers = opts.workers if opts.workers > 0 else min(8, (os.cpu_count() or 2) - 1)
    keys = data.run_batches(len(train), cfg.batch_size, 0, 0, 40 + 2 * workers)
    loader = iter(torch.utils.data.DataLoader(train, batch_sampler=keys, num_workers=workers,
                                              pin_memory=device.type == "cuda", prefetch_factor=4))
    for _ in range(2 * workers):  # workers started, queues filled
        next(loader)
    t0 = time.perf_counter()
    for _ in range(40):
        next(loader)
    rate = 40 * cfg.batch_size / (time.perf_counter() - t0)
    print(f"  data loader alone ({opts.data}, {workers} workers, synthesizer included): {rate:.1f} images/s")


def bench_inference(cfg, opts, device, n_images, mem):
    """Alg. 2: the authors' loop (one image, one time step at a time) against the shipped path."""
    model = diffusionad.build_model(cfg, device=device, cls=diffusionad.model_class(opts), opts=opts).eval()
    ts = cfg.eval_t
    images = torch.rand(n_images, 3, *data.hw(cfg.img_size))
    noise = torch.randn(n_images, len(ts), 3, *data.hw(cfg.img_size), device=device)

    def naive():  # the authors' evaluation: one image and one time step at a time, autograd on, fp32
        for i in range(n_images):
            x = images[i: i + 1].to(device)
            m = torch.stack([model.anomaly_maps(x, (t,), noise[i, k: k + 1])[0] for k, t in enumerate(ts)]).mean(0)
            m.flatten(1).topk(cfg.top_k, dim=1).values.mean(1).item()
    print(f"inference, {'x'.join(map(str, data.hw(cfg.img_size)))}, base {cfg.base_channels}, t = {cfg.eval_t}, {n_images} images, "
          f"{device}:")
    base_fps = None
    plain, bf16 = replace(opts, amp=False, eval_amp=False, compile=False, log_every=1e9), inference_bf16(opts, device)
    paths = [("naive (1 image, time steps in turn, autograd on, fp32)", None),
             (f"shipped (batch {opts.eval_batch}, time steps batched, inference_mode, fp32)", plain)]
    if bf16 or opts.compile:  # --amp, or the CPU preset's bf16 inference
        paths.append((f"shipped with{' bf16' if bf16 else ''}{' compile' if opts.compile else ''}"
                      f"{' + CUDA graphs' if opts.compile and device.type == 'cuda' else ''}",
                      replace(opts, log_every=1e9)))
    for name, o in paths:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fn = naive if o is None else (lambda o=o: run_inference(model, images, cfg, o, device))
        fps = n_images / timed(fn, device)
        base_fps = base_fps or fps
        print(f"  {name}: {fps:.3g} images/s ({fps / base_fps:.2f}x), {mem} {peak_memory_mb(device):.0f} MiB")
    if opts.compile:
        print("  " + compile_report())


def main(args):
    """bench: every flag of train sets the model and the data (extras/cli.py)."""
    if args.train_steps < 1 or args.n_images < 1:
        raise SystemExit(f"bench: --train-steps and --n-images must be >= 1, got {args.train_steps} and "
                         f"{args.n_images}")
    cfg, opts = check_flags(*from_flags(args, diffusionad.Config), diffusionad.channel_mult)
    device = pick_device(opts)
    mem = "peak GPU memory" if device.type == "cuda" else "process peak RSS so far"
    bench_training(cfg, opts, device, args.train_size, args.train_steps, mem)
    bench_inference(cfg, opts, device, args.n_images, mem)
