"""Run folders and what is in them: the folder of a run and its lock, one atomic write, config.json, checkpoints
(saved, loaded with weights_only=True, compared on --resume) and the run that eval, predict and export name."""
import fcntl
import json
import os
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch

from extras.options import RECIPE, RESUMABLE, RunOptions, check_flags, config_and_options

VERSION = 3  # the checkpoint format: the authors' networks, 0-based t, L_noise over every image (Eq. 6)


def run_folder(opts, benchmark=False):
    """--out, or runs/<name>[-<ablation>][-authors]: <parent>-<class> for a class folder, <root> for a benchmark."""
    if opts.out:
        return Path(opts.out)
    p = Path(opts.data.rstrip("/"))
    name = p.name if benchmark or p.name == "synthetic" or not p.parent.name else f"{p.parent.name}-{p.name}"
    return Path("runs") / (name + ("" if opts.ablation == "none" else "-" + opts.ablation)
                           + ("-authors" if opts.variant == "authors" else ""))


def atomic_write(path, content):
    """Write text (str) or a torch object to a temporary file, then rename: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(content, str):
        tmp.write_text(content)
    else:
        torch.save(content, tmp)
    os.replace(tmp, path)


def settings(cfg, opts):
    """The settings of a run as one flat dict (config.json, a checkpoint's "config", metrics.json's)."""
    return {**asdict(cfg), **asdict(opts)}


def make_folder(folder):
    """A run folder, new or existing; one line when it cannot be made."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"{folder}: cannot write the run folder ({e.strerror}); pass a writable --out")


def write_config(folder, cfg, opts):
    """A run's config.json."""
    make_folder(folder)
    atomic_write(Path(folder) / "config.json", json.dumps(settings(cfg, opts), indent=2))


def lock_run(folder):
    """An exclusive lock on the run folder while this process trains it (released when the process dies, kill -9
    included): a second `train` on the same folder refuses to start."""
    make_folder(folder)
    f = open(Path(folder) / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise SystemExit(f"{folder} is being trained by another process (pid {f.read().strip() or '?'}); "
                         "wait for it to end, or pass another --out")
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def latest_run():
    ckpts = sorted(Path("runs").glob("**/ckpt.pt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise SystemExit("no run found under runs/: pass --run DIR or --ckpt FILE")
    return ckpts[-1]


def save_checkpoint(path, model, opt, step, cfg, opts, seconds=0.0, threshold=None, **extra):
    """Both networks, the optimizer, the step, the settings, the decision threshold once it is known, and `extra`
    entries that are not None (an imported model's origin, the training images' aspects). Loadable with
    torch.load(weights_only=True)."""
    state = {"denoiser": model.denoiser.state_dict() if model.denoiser is not None else {},
             "seg": model.seg.state_dict() if model.seg is not None else {},
             "optimizer": opt.state_dict() if opt is not None else {}, "step": step, "seconds": seconds,
             "config": settings(cfg, opts), "version": VERSION}
    if threshold is not None:
        state["threshold"] = threshold
    atomic_write(path, {**state, **{k: v for k, v in extra.items() if v is not None}})


def load_checkpoint(path, config_cls):
    """(state, Config, RunOptions) of a checkpoint; one line for anything that is not ours."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"{path}: not a readable DiffusionAD checkpoint ({type(e).__name__}: {str(e)[:200]})")
    if isinstance(ckpt, dict) and {"unet_model_state_dict", "seg_model_state_dict"} <= ckpt.keys():
        raise SystemExit(f"{path}: a checkpoint of the authors' train.py; convert it first: python diffusionad.py "
                         f"import-authors {path} --out RUN")
    if not isinstance(ckpt, dict) or not {"denoiser", "seg", "config", "step"} <= ckpt.keys():
        raise SystemExit(f"{path}: not a DiffusionAD checkpoint (missing keys)")
    if ckpt.get("version", 1) != VERSION:
        raise SystemExit(f"{path}: checkpoint format {ckpt.get('version', 1)}, written by another version of "
                         f"diffusionad (this one reads format {VERSION}); evaluate it with the version that wrote it")
    unknown = set(ckpt["config"]) - {f.name for f in fields(config_cls) + fields(RunOptions)}
    if unknown:
        raise SystemExit(f"{path}: checkpoint config has unknown fields {sorted(unknown)} (a newer version?)")
    return (ckpt, *config_and_options(ckpt["config"], config_cls))


def check_same_run(saved, requested, path):
    """saved, requested: (Config, RunOptions). On --resume only RESUMABLE fields and how the run is done (but data
    and holdout) may differ."""
    fixed = {"data", "holdout", *RECIPE}
    names = [(f.name, c) for c in (0, 1) for f in fields(saved[c])
             if f.name not in RESUMABLE and (c == 0 or f.name in fixed)]
    diff = [f"{n}: checkpoint {getattr(saved[c], n)!r} vs requested {getattr(requested[c], n)!r}"
            for n, c in names if getattr(saved[c], n) != getattr(requested[c], n)]
    if diff:
        raise SystemExit(f"{path} was trained with another configuration:\n  " + "\n  ".join(diff))


def open_run(args, config_cls, channel_mult):
    """eval/predict/export arguments -> (checkpoint path, state, Config with --eval-t, RunOptions with the command's
    device and speed flags)."""
    path = Path(args.ckpt) if args.ckpt else (Path(args.run) / "ckpt.pt" if getattr(args, "run", None) else latest_run())
    state, cfg, opts = load_checkpoint(path, config_cls)
    if getattr(args, "alg2", False) and opts.variant != "paper":  # the paper's Alg. 2 (its time steps unless given)
        opts, cfg = replace(opts, variant="paper"), replace(cfg, eval_t=config_cls().eval_t)
    cfg = replace(cfg, eval_t=getattr(args, "eval_t", None) or cfg.eval_t)
    bf16 = (opts.eval_amp or opts.amp) and args.amp is not False  # the run's bf16 inference where native; --no-amp: off
    opts = replace(opts, device=args.device, amp=bool(args.amp), eval_amp=bf16, compile=args.compile,
                   eval_batch=args.eval_batch or opts.eval_batch, log_every=args.log_every or opts.log_every)
    check_flags(cfg, opts, channel_mult)
    return path, state, cfg, opts
