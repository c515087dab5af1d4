"""export: a run's Alg. 2 as one torch.export program (any batch size up to 4096, the run's noise inside), loadable
with torch alone, and a JSON beside it with the threshold and the input contract. The program computes in float32:
its scores equal predict's in float32 (`predict --no-amp` for a run that infers in bf16)."""
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

import data

from extras.checkpoints import atomic_write
from extras.inference import batched_maps, inference_noise
from extras.predict import open_model
from extras.thresholds import stored


class Alg2Program(nn.Module):
    """Alg. 2 as one module for torch.export: images (B,3,S,S) in [0, 1] -> maps (B,S,S), scores (B,), with the
    run's fixed noise inside (inference.inference_noise), the noise predict uses, and predict's batched path."""

    def __init__(self, model, cfg):
        super().__init__()
        self.model, self.ts = model, tuple(cfg.eval_t)
        self.register_buffer("eps", inference_noise(cfg.seed, len(self.ts), cfg.img_size))

    def forward(self, x):
        maps, scores, _ = batched_maps(self.model, x, self.ts, self.eps)
        return maps, scores


def main(args):
    """export: Alg. 2 of a run as one torch.export program and its threshold beside it."""
    check_export_path(args.out)  # before any work
    path, state, cfg, opts, model = open_model(args)
    program = Alg2Program(model, cfg).eval().requires_grad_(False)
    H, W = data.hw(cfg.img_size)
    example = torch.rand(2, 3, H, W)
    exported = torch.export.export(program, (example,), dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},))
    threshold, source = stored(state, cfg, opts, path)
    export_files(args.out, exported, {
        "checkpoint": str(path), "threshold": None if threshold is None else threshold["value"],
        "threshold_rule": threshold or source, "img_size": cfg.img_size, "height": H, "width": W,
        "eval_t": list(cfg.eval_t), "top_k": cfg.top_k, "precision": "float32",
        "input": f"float32 (B, 3, {H}, {W}) RGB in [0, 1], resized bilinearly",
        "outputs": f"maps (B, {H}, {W}) in [0, 1], scores (B,); anomalous when score >= threshold"})


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
    atomic_write(out.with_suffix(".json"), json.dumps(info, indent=2))
    print(f"wrote {out} and {out.with_suffix('.json')}")
