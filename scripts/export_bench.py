"""The exported program against predict's path, side by side in one process, on the same images.

python scripts/export_bench.py RUN/ckpt.pt MODEL.pt2 FOLDER [--n 128]
Reads up to n images of FOLDER (file reading not timed), scores them with predict's path
(diffusionad.run_inference: batches of the run's --eval-batch, NHWC on CPUs) and with the exported program
(torch.export.load(...).module(), the same batch size), each after a warm-up batch, and prints images/s for
each and the largest difference between their scores.
"""
import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffusionad  # noqa: E402
from extras.checkpoints import load_checkpoint  # noqa: E402
from extras.folders import list_images, load_image  # noqa: E402
from extras.inference import run_inference  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("program")
    p.add_argument("folder")
    p.add_argument("--n", type=int, default=128)
    args = p.parse_args()
    opts = replace(load_checkpoint(args.ckpt, diffusionad.Config)[2], device="cpu", compile=False, amp=False, log_every=1e9)
    model, cfg = diffusionad.load(args.ckpt)
    program = torch.export.load(args.program).module()
    images = torch.stack([load_image(f, cfg.img_size) for f in list_images([args.folder])[: args.n]])
    B = opts.eval_batch

    def exported():
        with torch.inference_mode():
            return np.concatenate([program(images[i: i + B])[1].numpy() for i in range(0, len(images), B)])
    rows = []
    for name, fn in (("predict's path (run_inference)", lambda: run_inference(model, images, cfg, opts,
                                                                             torch.device("cpu"))[1]),
                     ("exported program", exported)):
        fn()  # warm-up
        t0 = time.perf_counter()
        scores = fn()
        rows.append((name, len(images) / (time.perf_counter() - t0), scores))
    for name, fps, _ in rows:
        print(f"{name}: {fps:.1f} images/s ({len(images)} images of {cfg.img_size} px, batch {B}, "
              f"{torch.get_num_threads()} threads)")
    print(f"largest score difference: {np.abs(rows[0][2] - rows[1][2]).max():.2e}")


if __name__ == "__main__":
    main()
