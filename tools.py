"""The verbs beside the paper: predict and export (your own images), bench (speed and memory), table (a benchmark's
results). `python diffusionad.py predict|export|bench|table ...` lands here.

predict scores images with a run's model and decides with its stored threshold; export writes Alg. 2 as one
torch.export program with the run's noise inside; bench times the plain path (fp32, NCHW, a host sync every step,
for-each Adam; for inference the authors' loop: one image and one time step at a time, autograd on) against the
shipped one with the command's --amp / --compile (NHWC and fused Adam on CUDA, no per-step sync, padded
fixed-shape inference batches, the time steps in one batch), with peak memory, and the synthesizer's DataLoader.
"""
import argparse
import csv
import json
import os
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import ablations
import authors
import data
import diffusionad as D
import runs


def main(a):
    """predict, export or table, parsed by runs.parser."""
    if a.cmd == "predict":
        predict_cmd(a)
    elif a.cmd == "export":
        export_cmd(a)
    else:
        print(runs.write_table(a.folder))


def model_class(opts):
    """The class of a run: DiffusionAD, a Table 3 variant (ablations.py), or the authors' variant (authors.py)."""
    return authors.NormGuided if opts.variant == "authors" else ablations.model_class(opts)


def build_model(cfg, opts, state=None, device="cpu"):
    """The model of any run (its class, and the authors' variant's guidance weight); ValueError if it does not fit."""
    return (authors.build_model if opts.variant == "authors" else ablations.build_model)(cfg, opts, state, device)


def load(a):
    """(path, state, cfg, opts, model) of the run that eval/predict/export arguments name."""
    path, state, cfg, opts = runs.open_run(a, D.Config, D.channel_mult)
    return path, state, cfg, opts, runs.one_line(build_model, cfg, opts, state).eval()


# ----------------------------------------------------------------------------- predict

def predict_cmd(a):
    try:
        files = data.list_images(a.inputs)
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    path, state, cfg, opts, model = load(a)
    device = runs.pick_device(opts)
    model.to(device)
    threshold, source = runs.stored_threshold(state, cfg, opts, path, a.threshold)
    threshold = threshold["value"] if isinstance(threshold, dict) else threshold
    predict(a, path, files, lambda x: D.run_inference(model, x, cfg, opts, device)[:2], cfg.img_size, threshold, source)


def predict_outputs(a, path):
    """predict's new heatmap folder (RUN/predictions-<date-time>[_k], or an empty --out) and its CSV stream."""
    stamp = path.parent / f"predictions-{time.strftime('%Y%m%d-%H%M%S')}"
    out, k = Path(a.out) if a.out else stamp, 1
    while not a.out and out.exists():  # a new default folder, even for two predictions within one second
        k += 1
        out = stamp.with_name(f"{stamp.name}_{k}")
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"--out {out} is not empty: pass a new folder, so that no earlier result is overwritten")
    if a.csv and Path(a.csv).exists():
        raise SystemExit(f"--csv {a.csv} exists: pass a new file name")
    out.mkdir(parents=True, exist_ok=True)
    return out, (open(a.csv, "w", newline="") if a.csv else sys.stdout)


def predict(a, path, files, score, img_size, threshold, source):
    """Score files in chunks (any folder size fits in memory): score(images (N,3,S,S)) -> (maps, scores).
    Writes path,score,anomalous,heatmap rows (anomalous: score >= threshold, from `source`) and input | heatmap
    PNGs; unreadable files are listed at the end."""
    out, stream = predict_outputs(a, path)
    writer = csv.writer(stream)
    writer.writerow(["path", "score", "anomalous", "heatmap"])
    bad, used, done, flagged, t0 = [], set(), 0, 0, time.time()
    for i in range(0, len(files), 64):
        chunk, images = [], []
        for f in files[i: i + 64]:
            try:
                images.append(data.load_image(f, img_size))
                chunk.append(f)
            except (FileNotFoundError, ValueError) as e:
                bad.append(str(e))
        if not chunk:
            continue
        maps, scores = score(torch.stack(images))
        for f, img, m, s in zip(chunk, images, maps, scores):
            png = out / (f"{f.stem}_map.png" if f.stem not in used else f"{f.parent.name}_{f.stem}_{len(used)}_map.png")
            used.add(f.stem)
            data.save_png(png, np.concatenate([data.to_uint8(img), data.heatmap(m)], axis=1))
            verdict = "" if threshold is None else int(s >= threshold)
            flagged += verdict == 1
            writer.writerow([str(f), f"{s:.6f}", verdict, str(png)])
        done += len(chunk)
        if len(files) > 64:
            rate = done / (time.time() - t0)
            print(f"  {done}/{len(files)} images, {rate:.1f}/s, eta {runs.fmt_time((len(files) - i - 64) / rate)}",
                  file=sys.stderr if not a.csv else sys.stdout, flush=True)
    if a.csv:
        stream.close()
        print(f"wrote scores of {done} images to {a.csv} and heatmaps to {out}")
    print(f"{flagged} of {done} images flagged as anomalous (score >= threshold {threshold:.6f}, {source})"
          if threshold is not None else f"no threshold: {source}; the anomalous column is empty",
          file=sys.stderr if not a.csv else sys.stdout)
    if bad:
        raise SystemExit(f"{len(bad)} of {len(files)} files could not be read and were skipped:\n  " + "\n  ".join(bad))


# ----------------------------------------------------------------------------- export

class Alg2Program(nn.Module):
    """Alg. 2 as one module for torch.export: images (B,3,S,S) in [0, 1] -> maps (B,S,S), scores (B,), with the
    run's fixed noise inside (diffusionad.inference_noise), the noise predict uses, and predict's batched path."""

    def __init__(self, model, cfg):
        super().__init__()
        self.model, self.ts = model, D.ints(cfg.eval_t)
        self.register_buffer("eps", D.inference_noise(cfg.seed, len(self.ts), cfg.img_size))

    def forward(self, x):
        maps, scores, _ = D.batched_maps(self.model, x, self.ts, self.eps)
        return maps, scores


def export_cmd(a):
    check_export_path(a.out)  # before any work
    path, state, cfg, opts, model = load(a)
    program = Alg2Program(model, cfg).eval().requires_grad_(False)
    example = torch.rand(2, 3, cfg.img_size, cfg.img_size)
    exported = torch.export.export(program, (example,), dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},))
    threshold, source = runs.stored_threshold(state, cfg, opts, path)
    export_files(a.out, exported, {
        "checkpoint": str(path), "threshold": None if threshold is None else threshold["value"],
        "threshold_rule": threshold or source, "img_size": cfg.img_size,
        "eval_t": list(D.ints(cfg.eval_t)), "top_k": cfg.top_k,
        "input": f"float32 (B, 3, {cfg.img_size}, {cfg.img_size}) RGB in [0, 1], resized bilinearly",
        "outputs": "maps (B, S, S) in [0, 1], scores (B,); anomalous when score >= threshold"})


def check_export_path(out):
    out = Path(out)
    if out.suffix != ".pt2":
        raise SystemExit(f"--out {out}: the file name must end in .pt2 (torch.export's format)")
    if out.exists():
        raise SystemExit(f"--out {out} exists: pass a new file name")


def export_files(out, program, info):
    """The exported program (torch.export.save) and a JSON beside it with the threshold and the input contract."""
    out = Path(out)
    check_export_path(out)  # again: another process may have written it meanwhile
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.pt2")  # torch.export.save wants the .pt2 ending
    torch.export.save(program, str(tmp))
    os.replace(tmp, out)
    runs.atomic_write(out.with_suffix(".json"), json.dumps(info, indent=2))
    print(f"wrote {out} and {out.with_suffix('.json')}")


# ----------------------------------------------------------------------------- bench

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
    cls = model_class(opts)
    B = tcfg.batch_size
    x0 = torch.rand(B, 3, train_size, train_size, device=device)
    mask = (torch.rand(B, 1, train_size, train_size, device=device) > 0.9).float()
    print(f"training step, {train_size}x{train_size}, batch {B}, base {cfg.base_channels}, {device}:")
    for shipped in (False, True):
        o = opts if shipped else replace(opts, amp=False, compile=False)
        torch.manual_seed(cfg.seed)
        fmt = runs.memory_format(o, device) if shipped else torch.contiguous_format
        model = D.build_model(tcfg, device=device, cls=cls).train().to(memory_format=fmt)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=shipped and device.type == "cuda")
        if shipped and o.compile:
            runs.compile_networks(model)
        x = x0.contiguous(memory_format=fmt)
        g = torch.Generator().manual_seed(0)
        t = torch.randint(0, tcfg.timesteps, (B,), generator=g).to(device)
        eps = torch.randn(x.shape, generator=g).to(device)
        inputs = (x, mask, t, eps, x)  # Alg. 1; the authors' variant: its two time steps and noises
        if opts.variant == "authors":
            noisier = opts.guide_t + t % (tcfg.timesteps - opts.guide_t)
            inputs = (x, mask, mask.flatten(1).amax(1) == 0, t % opts.guide_t, noisier, eps,
                      torch.randn(x.shape, generator=g).to(device))

        def step():
            with runs.autocast(o, device):
                loss = model(*inputs)["total"]
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
    model, ts = build_model(cfg, opts, device=device).eval(), D.ints(cfg.eval_t)
    images = torch.rand(n_images, 3, cfg.img_size, cfg.img_size)
    noise = torch.randn(n_images, len(ts), 3, cfg.img_size, cfg.img_size, device=device)

    def naive():  # the authors' evaluation: one image and one time step at a time, autograd on, fp32
        for i in range(n_images):
            x = images[i: i + 1].to(device)
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


def bench(argv=None):
    """python diffusionad.py bench [flags]: every flag of train sets the model and the data."""
    p = argparse.ArgumentParser(prog="diffusionad.py bench", description=__doc__.split("\n\n")[1],
                                allow_abbrev=False)
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
