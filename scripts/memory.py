"""Peak memory and time of one training step, per image: the paper's step (Alg. 1, one denoiser pass per image)
and the authors' variant's (extras/authors.py, two passes), fp32 and bf16 autocast (--amp), with and without activation
checkpointing of the denoiser's stages (--checkpointing).

    python scripts/memory.py [--size 256 --base 128 --batches 1,2]

Each measurement is one fresh process (a process's peak RSS is a high-water mark): the model of Config() at the
given size and width and Adam are built, then one training step (forward, backward, Adam's first update, which
allocates its state) on random images; it reports the process's peak RSS after the backward pass and after the
step, and the step's seconds. Per image: the difference of the backward peaks at the two batch sizes (the
activations); fixed: the rest of that peak (weights, gradients, torch itself). Adam's update then adds its two
moments and may set the step's peak at small batches (with checkpointing), independent of the batch. The
projection to a batch of 16 is the larger of fixed + 16 x per image and the smaller batch's step peak. CPU memory,
not GPU memory: the allocators differ, the activations they hold are the same tensors. Never used to pick
anything.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffusionad  # noqa: E402
from extras.authors import NormGuided  # noqa: E402
from extras.options import ints  # noqa: E402
from extras.speed import checkpoint_stages  # noqa: E402


def one_step(size, base, batch, variant, amp, checkpointing):
    """In this process: one training step; prints {"peak_gib", "seconds"} as JSON."""
    torch.manual_seed(0)
    cfg = diffusionad.Config(img_size=size, base_channels=base)
    model = (NormGuided if variant == "authors" else diffusionad.DiffusionAD)(cfg).train()
    if checkpointing:
        checkpoint_stages(model.denoiser)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x0, mask = torch.rand(batch, 3, size, size, generator=g), torch.zeros(batch, 1, size, size)
    mask[batch // 2:, :, size // 4: size // 2, size // 4: size // 2] = 1
    draw = lambda lo, hi: torch.randint(lo, hi, (batch,), generator=g)
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        if variant == "authors":
            loss = model(x0, mask, mask.flatten(1).amax(1) == 0, draw(0, 300), draw(300, 1000),
                         torch.randn(x0.shape, generator=g), torch.randn(x0.shape, generator=g))
        else:
            loss = model(x0, mask, draw(0, 1000), torch.randn(x0.shape, generator=g))
    loss["total"].backward()
    backward_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    opt.step()
    seconds = time.perf_counter() - t0
    print(json.dumps({"peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                      "backward_gib": backward_gib, "seconds": seconds}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--base", type=int, default=128)
    ap.add_argument("--batches", default="1,2")
    ap.add_argument("--one", nargs=5, metavar=("BATCH", "VARIANT", "AMP", "CKPT", "_"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one_step(args.size, args.base, int(args.one[0]), args.one[1], args.one[2] == "1", args.one[3] == "1")
    b1, b2 = ints(args.batches)
    print(f"one training step at {args.size} px, base {args.base}, {torch.get_num_threads()} threads; peak RSS of the process")
    print("| step | precision | activation checkpointing | peak at batch %d (GiB): backward / step | at batch %d "
          "| per image | fixed | batch 16, projected | seconds per image (batch %d) |" % (b1, b2, b2))
    print("|---|---|---|---|---|---|---|---|---|")
    for variant in ("paper", "authors"):
        for amp in (0, 1):
            for ckpt in (0, 1):
                res = [measure(args.size, args.base, b, variant, amp, ckpt) for b in (b1, b2)]
                head = f"| {variant} | {'bf16 autocast' if amp else 'fp32'} | {'yes' if ckpt else 'no'} | "
                if isinstance(res[0], str) or isinstance(res[1], str):  # a failed process (killed for memory, ...)
                    print(head + " | ".join(r if isinstance(r, str) else peaks(r) for r in res)
                          + " | - | - | - | - |", flush=True)
                    continue
                per = (res[1]["backward_gib"] - res[0]["backward_gib"]) / (b2 - b1)
                fixed = res[0]["backward_gib"] - b1 * per
                print(head + f"{peaks(res[0])} | {peaks(res[1])} | {per:.2f} | {fixed:.2f} | "
                      f"{max(fixed + 16 * per, res[0]['peak_gib']):.1f} | {res[1]['seconds'] / b2:.1f} |", flush=True)


def peaks(r):
    return f"{r['backward_gib']:.2f} / {r['peak_gib']:.2f}"


def measure(size, base, batch, variant, amp, ckpt):
    """One fresh process; its JSON, or a short reason where it failed (the OOM killer's SIGKILL: -9)."""
    p = subprocess.run([sys.executable, __file__, "--size", str(size), "--base", str(base), "--one", str(batch),
                        variant, str(amp), str(ckpt), "-"], capture_output=True, text=True)
    if p.returncode != 0:
        return "killed (SIGKILL: out of memory)" if p.returncode == -9 else f"failed (exit {p.returncode})"
    return json.loads(p.stdout.splitlines()[-1])


if __name__ == "__main__":
    main()
