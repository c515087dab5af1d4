"""Run management for diffusionad.py: everything a training or evaluation run needs that is not the paper.

Run options (the flags that say how a run is done, not what is learned), the CPU preset and the checks of
every flag, devices and speed paths, run folders and their lock, one atomic write, checkpoints (and the
options of earlier versions), the loss log and its stop on a non-finite loss, Ctrl-C / SIGTERM and
--max-minutes, torchrun and the data-parallel BatchNorm, whole-benchmark sweeps and their table, and the
files that eval, predict and export write. It imports data and metrics, never diffusionad: what it needs
from the model (the Config class, the model object, the train function) is passed in.
"""
import argparse
import copy
import csv
import fcntl
import functools
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics


def opt(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Recipe:
    """Options apart from the paper's Config: our recipe knobs (each default is the paper's behaviour, each measured
    in docs/RESULTS.md) and the authors' released variant with its settings (args1.json). Every field is a flag."""
    ablation: str = opt("none", "Table 3's variants (ablations.py): none (DiffusionAD) | seg-only (SegmentationAD) | ae "
                        "(DRAEM+: DRAEM's autoencoder, L2 + SSIM) | denoise-only (DenoisingAD)")
    max_steps: int = opt(0, "if > 0, train this many steps instead of --epochs (CPU budgets)")
    lr_schedule: str = opt("constant", "constant (paper) | cosine: decay to 0 at the last step (--preset cpu; a resume "
                           "with more steps stretches the decay)")
    train_t: int = opt(0, "Alg. 1 draws t ~ U{0..train_t-1}; 0 = T (paper; --preset cpu: 300)")
    crop: int = opt(0, "if > 0, train on crops of this side that keep part of the anomaly; evaluate whole images "
                    "(with --attn-resolutions '': a fully convolutional denoiser)")
    anomaly_shape: str = opt("perlin", "synthetic anomaly masks: perlin (paper) | curves (thin strokes) | mixed (half "
                             "each) | small (PCB-sized spots and strokes) (data.py)")
    anomaly_fill: str = opt("blend", "synthetic anomaly content: blend (Eq. 9, paper) | invert (1 - N inside the mask: "
                            "the other material of a binarised image such as a PCB scan)")
    variant: str = opt("paper", "which DiffusionAD: paper (Alg. 1 and 2) | authors (their released, norm-guided code, "
                       "authors.py: batch 16, 3000 epochs and eval-t 200,400 unless given)")
    guide_t: int = opt(300, "--variant authors: the normal t ~ U{0..guide_t-1}, the noisier t ~ U{guide_t..T-1} "
                       "(their less_t_range)")
    condition_w: float = opt(1.0, "--variant authors: the guidance weight (their condition_w)")
    seg_lr: float = opt(1e-5, "--variant authors: the segmentation net's Adam rate (their seg_lr), on a cosine wave "
                        "of period 2 * seg_lr_period steps (their CosineAnnealingLR, stepped every iteration)")
    seg_lr_period: int = opt(10, "--variant authors: T_max of that CosineAnnealingLR")


@dataclass
class RunOptions(Recipe):
    """Our recipe options (Recipe's fields), then how a run is done: data, folders, devices, speed, logging. All may
    change when a run is resumed except data and holdout (the training images) and the recipe's fields but
    max_steps. Every field is a flag (`eval_batch` -> `--eval-batch`)."""
    data: str = opt("synthetic", "ROOT/CLASS (MVTec AD, VisA raw or 1cls, DAGM 2007), a plain folder of normal "
                    "images, or 'synthetic'; a whole benchmark ROOT trains and evaluates every class in turn")
    test: str = opt("", "a labelled test folder for a plain --data folder (or instead of a dataset's own test split): "
                    "good/ and one folder per defect type; masks, where there are any, in TEST/masks/<type>/<stem>.png "
                    "or --test-masks")
    test_masks: str = opt("", "masks of --test: a folder of <type>/<stem>.png or <type>/<stem>_mask.png (default: "
                          "TEST/masks)")
    out: str = opt("", "run folder (default runs/<dataset>-<class>; for a benchmark ROOT, runs/<root name>)")
    classes: str = opt("", "with a benchmark ROOT: only these classes, e.g. candle,pcb1 (default: all)")
    holdout: float = opt(0.1, "fraction of the normal training images (at least 5) kept out of training to set the "
                         "decision threshold; 0 = train on all of them (paper), no threshold")
    threshold_quantile: float = opt(0.99, "the threshold is this quantile of the held-out normal images' scores")
    device: str = opt("auto", "auto (CUDA when present; cuda:LOCAL_RANK under torchrun) | cpu | cuda | cuda:N")
    amp: bool = opt(False, "bf16 autocast (GPUs; CPUs only with native bf16: AMX or AVX512-BF16)")
    compile: bool = opt(False, "torch.compile both networks (training) and Alg. 2 (inference; CUDA graphs on a GPU)")
    checkpointing: bool = opt(False, "activation checkpointing of the denoiser's stages in training: their activations "
                              "are recomputed in the backward pass instead of kept (less memory, more time)")
    workers: int = opt(-1, "DataLoader worker processes for the synthesizer; -1 = auto (GPU: min(8, cores - 1), CPU: 0)")
    eval_batch: int = opt(8, "test images per inference batch")
    max_minutes: float = opt(0.0, "if > 0, end training after this many minutes (resumed runs included) with a "
                             "checkpoint and the normal final evaluation")
    ckpt_every: int = opt(500, "steps between checkpoints (always one at the end)")
    keep_ckpts: str = opt("", "steps whose checkpoint is also kept as ckpt_<step>.pt, e.g. 600,1200 (for curves)")
    log_every: float = opt(10.0, "seconds between progress lines")


# What may change when a run is resumed: the length of training and Alg. 2's settings (of Config and Recipe), and
# the run options other than data and holdout.
FREE = ("epochs", "max_steps", "eval_t", "top_k")
# Small model for a 2-core CPU (README quickstart); flags given on the command line win. train_t=300: Alg. 1's t
# from 0..299, as the authors' later code (docs/RESULTS.md: cleaner restorations, better pixel metrics).
# lr_schedule=cosine: with a constant 5e-4 the last steps' updates could leave the final model in a bad
# state (docs/RESULTS.md: DAGM seed 1, 79.2 -> 98.5 image AUROC with the same batches).
CPU_PRESET = dict(img_size=64, base_channels=16, num_res_blocks=1, channel_mult="1,2,4", attn_resolutions="16",
                  seg_channels=16, max_steps=900, lr=5e-4, lr_schedule="cosine", eval_batch=16, workers=0,
                  train_t=300)
# The authors' released variant: their args1.json where it differs from the paper's defaults (flags given win).
AUTHORS_PRESET = dict(batch_size=16, epochs=3000, eval_t="200,400")
# The checkpoint format: 3 = L_noise over every image of a batch (Eq. 6). 2 (L_noise over the normal half) has the
# same networks: its runs are evaluated, not resumed. 1 (our own networks, 1-based t) cannot be run by this code.
VERSION = 3
# Options that earlier versions had, with the one value this code implements: a checkpoint that used another
# value is refused.
REMOVED = {"pixel_range": "0,1", "clamp": "-1,1", "beta_schedule": "linear", "seg_grad": "full", "denoiser_warmup": 0}
CHOICES = {"ablation": ("none", "seg-only", "ae", "denoise-only"), "lr_schedule": ("constant", "cosine"),
           "variant": ("paper", "authors"),
           "anomaly_shape": data.SHAPES, "anomaly_fill": data.FILLS}


def ints(text):
    return tuple(int(v) for v in str(text).split(",") if v.strip())


def flag(name):
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------- flags and their checks

def add_flags(p, *classes):
    """One flag per dataclass field, with its help and default, in one --help group per class: the paper's Config,
    our Recipe, and how the run is done (RunOptions' own fields)."""
    recipe, theirs = {f.name for f in fields(Recipe)}, {"variant", "guide_t", "condition_w", "seg_lr", "seg_lr_period"}
    for cls in classes:
        groups = [(f"the paper's method ({cls.__name__})", fields(cls))]
        if cls is RunOptions:
            groups = [("our recipe options and Table 3 (runs.Recipe; the paper's behaviour by default)",
                       [f for f in fields(cls) if f.name in recipe - theirs]),
                      ("the authors' released version (authors.py)", [f for f in fields(cls) if f.name in theirs]),
                      ("how the run is done (runs.RunOptions)", [f for f in fields(cls) if f.name not in recipe])]
        for title, group in groups:
            g = p.add_argument_group(title)
            for f in group:
                if f.type is bool:
                    g.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                   help=f.metadata["help"])
                else:
                    g.add_argument(flag(f.name), type=f.type, default=argparse.SUPPRESS, metavar=f.type.__name__.upper(),
                                   help=f"{f.metadata['help']} (default: {f.default})")
    if len(classes) > 1:
        p.add_argument("--preset", choices=["paper", "cpu"], default="paper",
                       help="'cpu': a small model for 2 CPU cores (README quickstart); explicit flags still win")


def options_from(a, config_cls):
    """Parsed flags -> (Config, RunOptions): the preset's values, then the flags given."""
    given = {k: v for k, v in vars(a).items() if k in {f.name for f in fields(config_cls) + fields(RunOptions)}}
    preset = dict(CPU_PRESET) if getattr(a, "preset", "paper") == "cpu" else {}
    if preset and given.get("img_size", 64) != 64:  # the same 16-px bottom level at any size: attention stays cheap
        preset["channel_mult"] = {128: "1,2,2,4", 256: "1,2,2,4,4", 512: "1,2,2,4,4,4"}.get(given["img_size"], "")
        preset["eval_batch"] = 4  # at 256 px a batch of 16 ran at half the speed of 4, with 1.6x the memory
    if given.get("variant") == "authors":
        preset.update(AUTHORS_PRESET)
    values = {**preset, **given}
    return split(values, config_cls)


def split(values, config_cls):
    """A flat dict of fields (a checkpoint's "config", or flags) -> (Config, RunOptions)."""
    names = {f.name for f in fields(config_cls)}
    return (config_cls(**{k: v for k, v in values.items() if k in names}),
            RunOptions(**{k: v for k, v in values.items() if k not in names}))


def check(cfg, opts, channel_mult):
    """Every bad value at once, before any work: one SystemExit naming each flag. channel_mult: the model's
    function (Config -> level multipliers), which raises ValueError for a size it has no default for."""
    both = {**asdict(cfg), **asdict(opts)}
    problems = []
    for name in ("channel_mult", "attn_resolutions", "eval_t", "keep_ckpts"):
        try:
            ints(both[name])
        except ValueError:
            problems.append(f"{flag(name)} must be comma-separated integers, got {both[name]!r}")
    if problems:
        raise SystemExit("bad configuration:\n  " + "\n  ".join(problems))
    try:
        levels = len(channel_mult(cfg))
    except ValueError as e:
        raise SystemExit(f"bad configuration:\n  {e}")
    positive = ("img_size", "timesteps", "base_channels", "num_res_blocks", "num_heads", "seg_channels", "epochs",
                "eval_batch", "top_k", "ckpt_every")
    problems += [f"{flag(n)} must be >= 1, got {both[n]}" for n in positive if both[n] < 1]
    problems += [f"{flag(n)} must be >= 0, got {both[n]}" for n in
                 ("max_steps", "crop", "max_minutes", "dropout") if both[n] < 0]
    problems += [f"{flag(n)} must be > 0, got {both[n]}" for n in ("lr", "log_every") if not both[n] > 0]
    problems += [f"{flag(n)} must be in [0, 1), got {both[n]}" for n in ("holdout",) if not 0 <= both[n] < 1]
    problems += [f"{flag(n)} must be in [0, 1], got {both[n]}" for n in ("threshold_quantile",) if not 0 <= both[n] <= 1]
    if opts.workers < -1:
        problems.append(f"--workers must be >= 0, or -1 for auto, got {opts.workers}")
    if not (opts.device in ("auto", "cpu", "cuda") or opts.device.startswith("cuda:") and opts.device[5:].isdigit()):
        problems.append(f"--device must be auto, cpu, cuda or cuda:N, got {opts.device!r}")
    for name, allowed in CHOICES.items():
        if both[name] not in allowed:
            problems.append(f"{flag(name)} must be one of {', '.join(allowed)}, got {both[name]!r}")
    if opts.variant == "paper" and (cfg.batch_size < 2 or cfg.batch_size % 2):
        problems.append(f"--batch-size must be even (half normal, half synthetic), got {cfg.batch_size}")
    if opts.checkpointing and opts.ablation in ("seg-only", "ae"):
        problems.append(f"--checkpointing applies to the denoising UNet's stages; --ablation {opts.ablation} has none")
    if opts.variant == "authors":
        if not 0 < opts.guide_t < cfg.timesteps:
            problems.append(f"--guide-t must be in [1, {cfg.timesteps - 1}], got {opts.guide_t}")
        if len(ints(cfg.eval_t)) != 2:
            problems.append(f"--variant authors evaluates with one guided restoration: --eval-t NORMAL,NOISIER (theirs: "
                            f"200,400), got {cfg.eval_t!r}")
        if opts.ablation != "none":
            problems.append(f"--variant authors trains both networks: drop --ablation {opts.ablation}")
        if not (opts.seg_lr > 0 and opts.seg_lr_period >= 1):
            problems.append(f"need --seg-lr > 0 and --seg-lr-period >= 1, got {opts.seg_lr}, {opts.seg_lr_period}")
    if cfg.img_size % 32 or cfg.img_size % 2 ** (levels - 1):
        problems.append(f"--img-size {cfg.img_size} must be divisible by 32 and by 2^(levels-1) of --channel-mult")
    heads = ("--num-head-channels", cfg.num_head_channels) if cfg.num_head_channels > 0 else ("--num-heads", cfg.num_heads)
    if cfg.base_channels % heads[1]:
        problems.append(f"--base-channels {cfg.base_channels} must be divisible by {heads[0]} {heads[1]}")
    if not 0 < cfg.beta_start < cfg.beta_end < 1:
        problems.append(f"need 0 < --beta-start < --beta-end < 1, got {cfg.beta_start}, {cfg.beta_end}")
    if not 0 <= opts.train_t <= cfg.timesteps:
        problems.append(f"--train-t must be in [0, --timesteps {cfg.timesteps}] (0 = T), got {opts.train_t}")
    if opts.crop and (opts.crop > cfg.img_size or opts.crop % 2 ** (levels - 1) or opts.crop % 32):
        problems.append(f"--crop {opts.crop} must be <= --img-size and divisible by 32 and by 2^(levels-1)")
    bad_t = [t for t in ints(cfg.eval_t) if not 0 <= t < cfg.timesteps]
    if bad_t or not ints(cfg.eval_t):
        problems.append(f"--eval-t needs time steps in [0, {cfg.timesteps - 1}] (t = 0..T-1), got {cfg.eval_t!r}")
    if problems:
        raise SystemExit("bad configuration:\n  " + "\n  ".join(problems))
    return cfg, opts


# ----------------------------------------------------------------------------- devices and speed paths

def one_line(fn, *args, **kwargs):
    """fn(*args, **kwargs), with a ValueError (weights that do not fit the settings, a size without default
    multipliers) turned into one line for the user."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        raise SystemExit(str(e))


def pick_device(opts):
    """auto: CUDA when present (cuda:LOCAL_RANK under torchrun), else the CPU. --amp needs native bf16."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {opts.device}: no CUDA device is available")
    if opts.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(f"cuda:{local}" if opts.device == "cuda" else opts.device)
    if opts.amp and device.type == "cpu" and not (torch.cpu._is_amx_tile_supported() or
                                                  torch.cpu._is_avx512_bf16_supported()):
        raise SystemExit("--amp: this CPU has no native bf16 (AMX or AVX512-BF16); bf16 would be emulated and "
                         "slower than float32. Drop --amp")
    if opts.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit(f"--amp: {torch.cuda.get_device_name(device)} has no bf16 support. Drop --amp")
    return device


def memory_format(opts, device, inference=False):
    """NHWC where it is faster: on CUDA, for bf16 on CPUs (oneDNN's AMX kernels), and for inference on CPUs
    (fp32: 1.50x instead of 1.38x the naive loop at the paper's size, AMD EPYC, docs/RESULTS.md). CPU training
    in fp32 stays NCHW, the layout every CPU result here was trained with (same numbers, bit for bit)."""
    return torch.channels_last if inference or device.type == "cuda" or opts.amp else torch.contiguous_format


def autocast(opts, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.amp)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def checkpoint_stages(net):
    """Activation checkpointing (torch.utils.checkpoint, non-reentrant) of each stage of a DenoisingUNet (its down,
    middle and up steps) while training with gradients; the forward is replaced in place, state_dict keys stay."""
    from torch.utils.checkpoint import checkpoint
    stages = [*net.down, net.middle, *net.up] if hasattr(net, "middle") else []
    for stage in stages:
        plain = stage.forward
        stage.forward = functools.partial(
            lambda plain, x, emb: checkpoint(plain, x, emb, use_reentrant=False)
            if torch.is_grad_enabled() and net.training else plain(x, emb), plain)
    return len(stages)


def compile_networks(model):
    """torch.compile each network's forward in place: state_dict keys stay as they are. (nn.Module.compile()
    does not take effect in every torch release, so the forward is replaced explicitly.)"""
    for net in (model.denoiser, model.seg):
        if net is not None:
            net.forward = torch.compile(net.forward)


def compile_report():
    c = torch._dynamo.utils.counters
    return (f"torch.compile: {c['stats']['unique_graphs']} graphs compiled, "
            f"{sum(c['graph_break'].values())} graph breaks, {sum(c['recompiles'].values())} recompiles")


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------- run folders and files

def run_folder(opts, ablation, benchmark=False):
    """--out, or runs/<name>[-<ablation>][-authors]: <parent>-<class> for a class folder, <root> for a benchmark
    root; -authors for the authors' variant."""
    if opts.out:
        return Path(opts.out)
    p = Path(opts.data.rstrip("/"))
    name = p.name if benchmark or p.name == "synthetic" or not p.parent.name else f"{p.parent.name}-{p.name}"
    return Path("runs") / (name + ("" if ablation == "none" else "-" + ablation)
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


def lock_run(run):
    """An exclusive lock on the run folder for as long as this process trains it (the kernel releases it when
    the process dies, kill -9 included): a second `train` on the same folder refuses to start."""
    f = open(run / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise SystemExit(f"{run} is being trained by another process (pid {f.read().strip() or '?'}); "
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


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, model, opt, step, cfg, opts, seconds=0.0, threshold=None, **extra):
    """Both networks, the optimizer, the step, the settings as one flat dict, and the decision threshold once
    it is known (and `extra` entries, such as an imported model's origin). Loadable with torch.load(weights_only=True)."""
    state = {"denoiser": model.denoiser.state_dict() if model.denoiser is not None else {},
             "seg": model.seg.state_dict() if model.seg is not None else {},
             "optimizer": opt.state_dict() if opt is not None else {}, "step": step, "seconds": seconds,
             "config": {**asdict(cfg), **asdict(opts)}, "version": VERSION}
    if threshold is not None:
        state["threshold"] = threshold
    atomic_write(path, {**state, **extra})


def load_checkpoint(path, config_cls):
    """(state, Config, RunOptions) of a checkpoint; a clear SystemExit for anything that is not ours."""
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
    version = ckpt.get("version", 1)
    if version not in (2, VERSION):
        raise SystemExit(f"{path}: written by {'an earlier' if version < VERSION else 'a newer'} version of diffusionad "
                         f"(checkpoint format {version}, this code reads 2 and {VERSION}: the authors' networks and "
                         "0-based time steps); retrain it with this version")
    values = dict(ckpt["config"])
    for name, only in REMOVED.items():  # options of earlier versions: fine at the value this code implements
        if name in values and values.pop(name) != only:
            raise SystemExit(f"{path}: trained with --{name.replace('_', '-')} {ckpt['config'][name]}, an option this "
                             f"version no longer has (only {only}); evaluate it with the version that wrote it")
    unknown = set(values) - {f.name for f in fields(config_cls) + fields(RunOptions)}
    if unknown:
        raise SystemExit(f"{path}: checkpoint config has unknown fields {sorted(unknown)} (a newer version?)")
    return (ckpt, *split(values, config_cls))


def check_same_run(saved, cfg, path):
    """saved, cfg: (Config, RunOptions) pairs. Only FREE fields and the run options other than data, holdout and
    the recipe's may differ when a run is resumed."""
    fixed = {f.name for f in fields(Recipe)} | {"data", "holdout"}
    fixed = [(f.name, c) for c in (0, 1) for f in fields(saved[c])
             if f.name not in FREE and (c == 0 or f.name in fixed)]
    diff = [f"{n}: checkpoint {getattr(saved[c], n)!r} vs requested {getattr(cfg[c], n)!r}"
            for n, c in fixed if getattr(saved[c], n) != getattr(cfg[c], n)]
    if diff:
        raise SystemExit(f"{path} was trained with another configuration:\n  " + "\n  ".join(diff))


def open_run(a, config_cls, channel_mult):
    """eval/predict/export arguments -> (checkpoint path, state, Config with --eval-t, RunOptions with the
    command's device and speed flags)."""
    path = Path(a.ckpt) if a.ckpt else (Path(a.run) / "ckpt.pt" if getattr(a, "run", None) else latest_run())
    state, cfg, opts = load_checkpoint(path, config_cls)
    if getattr(a, "alg2", False) and opts.variant != "paper":  # the paper's Alg. 2 (at its time steps unless given)
        opts, cfg = replace(opts, variant="paper"), replace(cfg, eval_t=config_cls().eval_t)
    cfg = replace(cfg, eval_t=getattr(a, "eval_t", None) or cfg.eval_t)
    opts = replace(opts, device=a.device, amp=a.amp, compile=a.compile, eval_batch=a.eval_batch or opts.eval_batch,
                   log_every=a.log_every or opts.log_every)
    check(cfg, opts, channel_mult)
    return path, state, cfg, opts


# ----------------------------------------------------------------------------- data

def open_test(a, opts, img_size):
    """eval's test split: its --test or --data, else (or with a None) the run's own (its --test, or its
    dataset's)."""
    given = a is not None and (a.test or a.data)
    test, masks = (a.test, a.test_masks) if given else (opts.test, opts.test_masks)
    if not (given or test or opts.data):
        raise SystemExit("this run names no data (imported from the authors' checkpoint without --data); pass "
                         "--data ROOT/CLASS or --test TESTDIR")
    try:
        split = data.labelled_folder(test, img_size, masks or None) if test else \
            data.open_dataset(a.data if given else opts.data, "test", img_size)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{e}")
    problems = data.check_split(split)
    if problems:
        raise SystemExit(f"{test or (a.data if given else opts.data)}: {len(problems)} unreadable test file(s):\n  "
                         + "\n  ".join(problems[:10]))
    return split


def preflight(cfg, opts):
    """Open both splits and check every file (data.check_split) before the first training step. A plain
    folder has no test split of its own: --test gives one, or there is none (only the threshold)."""
    splits, problems = data.check_dataset(opts.data, cfg.img_size, cfg.foreground, test=opts.test or None,
                                          test_masks=opts.test_masks or None)
    if len(problems) == 1 and not splits:
        raise SystemExit(problems[0])
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise SystemExit(f"{opts.data}: {len(problems)} problem(s) found before training; fix them and start again:"
                         "\n  " + "\n  ".join(problems[:10]) + more)
    return splits


def training_split(opts, train):
    """(the images Alg. 1 trains on, the held-out slice that sets the threshold or None) of a train split."""
    try:
        return data.holdout_split(train, opts.holdout)
    except ValueError as e:
        raise SystemExit(f"{opts.data}: {e}")


def open_train(cfg, opts):
    try:
        return data.open_dataset(opts.data, "train", cfg.img_size, foreground=cfg.foreground)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{e}")


def make_trainset(cfg, opts, normal=None):
    """Alg. 1's TrainSet over `normal` (default: the whole train split of opts.data)."""
    normal = normal or open_train(cfg, opts)
    try:
        return data.TrainSet(normal, seed=cfg.seed, texture_dir=cfg.texture_dir or None, foreground=cfg.foreground,
                             shape=opts.anomaly_shape, fill=opts.anomaly_fill)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{e}")


# ----------------------------------------------------------------------------- torchrun

def distributed():
    """(rank, world size) in the data-parallel process group, or (0, 1) when there is none."""
    dist = torch.distributed
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def torchrun_env():
    """(rank, world size) that torchrun gave this process, or (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def sync_batch_norm(net):
    """Make every BatchNorm2d of net normalise over the global batch of all ranks in training (ours, for
    torchrun: torch's SyncBatchNorm runs on GPUs only). Statistics are summed across ranks with a
    differentiable all-reduce; evaluation is unchanged. The state_dict keeps its keys."""
    from torch.distributed.nn.functional import all_reduce

    def forward(bn, x):
        if not bn.training:
            return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        C, xf = x.shape[1], x.float()
        count = torch.full((1,), xf.numel() / C, device=x.device)
        with warnings.catch_warnings():  # deprecated, but documented as differentiable; kept for that
            warnings.simplefilter("ignore", FutureWarning)
            s = all_reduce(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))  # (2C+1,), all ranks
        n = s[-1]
        mean, var = s[:C] / n, (s[C:2 * C] / n - (s[:C] / n) ** 2).clamp_min(0)
        with torch.no_grad():
            bn.running_mean.lerp_(mean, bn.momentum)
            bn.running_var.lerp_(var * n / (n - 1), bn.momentum)
            bn.num_batches_tracked += 1
        y = (xf - mean[:, None, None]) * torch.rsqrt(var + bn.eps)[:, None, None]
        return (y * bn.weight[:, None, None] + bn.bias[:, None, None]).to(x.dtype)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.forward = functools.partial(forward, m)


def launch(cfg, opts, resume, train):
    """train: one class; a benchmark root: every class in turn; torchrun on one class: data-parallel."""
    _, world = torchrun_env()
    classes = [] if opts.data.startswith("synthetic") else data.find_classes(opts.data)
    if classes:
        return train_benchmark(cfg, opts, classes, train)  # finished classes are skipped, an interrupted one resumes
    if world == 1:
        return train(cfg, opts, resume=resume)
    cuda = torch.cuda.is_available() and opts.device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    try:
        return train(cfg, opts, resume=resume)
    finally:
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- one training run

class Run:
    """The plumbing of one training run, around Alg. 1's loop in diffusionad.train: checks, run folder and
    lock, data and the held-out slice, device, resume state, compile and data-parallel wrapping, the loss
    log, checkpoints, Ctrl-C / SIGTERM and --max-minutes. A context manager: leaving it closes the log,
    restores the signal handlers and releases the lock. Under torchrun rank 0 alone writes to the folder."""

    def __init__(self, cfg, opts, resume, config_cls):
        self.cfg, self.opts = cfg, opts
        self.rank, self.world = distributed()
        self.device, self.folder = pick_device(opts), run_folder(opts, opts.ablation)
        self.ckpt_path, self.state, self.lock, self.log, self.handlers = self.folder / "ckpt.pt", None, None, None, {}
        if resume:
            if not self.ckpt_path.is_file():
                raise SystemExit(f"--resume: no checkpoint at {self.ckpt_path} (train without --resume to start)")
            self.state, *saved = load_checkpoint(self.ckpt_path, config_cls)
            if "imported" in self.state:
                raise SystemExit(f"--resume: {self.ckpt_path} was imported from the authors' checkpoint and holds no "
                                 "optimizer state; train a new run with --out")
            if self.state.get("version") != VERSION:
                raise SystemExit(f"--resume: {self.ckpt_path} was trained with L_noise over the normal half of each "
                                 "batch (checkpoint format 2); this version averages it over every image (Eq. 6), so "
                                 "resuming would change the loss mid-run. Evaluate it, or train a new run with --out")
            check_same_run(saved, (cfg, opts), self.ckpt_path)
        elif self.ckpt_path.exists():
            raise SystemExit(f"{self.ckpt_path} exists: pass --resume to continue it, or --out for a new run")
        splits = preflight(cfg, opts)
        self.test = splits.get("test")
        normal, self.held_out = training_split(opts, splits["train"])
        self.trainset = make_trainset(cfg, opts, normal)
        self.per_batch = cfg.batch_size  # distinct normal images per rank and step: half as they are, half synthetic
        self.sampler = data.independent_batches if opts.variant == "authors" else data.run_batches
        self.steps_per_epoch = len(self.trainset) // (self.per_batch * self.world)
        if self.steps_per_epoch == 0:
            raise SystemExit(f"{opts.data}: {len(self.trainset)} training images, fewer than one step's "
                             f"{self.per_batch * self.world} (a batch takes distinct images); pass a smaller --batch-size")
        self.total = opts.max_steps if opts.max_steps > 0 else cfg.epochs * self.steps_per_epoch
        if self.rank == 0:  # last: a check that fails above leaves no lock held
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                self.lock = lock_run(self.folder)
                atomic_write(self.folder / "config.json", json.dumps({**asdict(cfg), **asdict(opts)}, indent=2))
            except OSError as e:
                raise SystemExit(f"{self.folder}: cannot write the run folder ({e.strerror}); pass a writable --out")

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        for s, h in self.handlers.items():
            signal.signal(s, h)
        if self.log is not None:
            self.log.close()
        if self.lock is not None:
            self.lock.close()
        if kind is not None and issubclass(kind, torch.cuda.OutOfMemoryError):
            raise SystemExit(f"CUDA out of memory at step {self.step + 1}: try a smaller --batch-size, --amp, or a "
                             f"smaller --img-size / --base-channels. Last checkpoint: "
                             f"{f'step {self.saved_step}' if self.saved_step is not None else 'none yet'}") from None
        return False

    def place(self, model):
        return model.to(self.device, memory_format=memory_format(self.opts, self.device))

    def start(self, model, opt):
        """Resume the optimizer, compile and wrap the model as asked, open the log, catch Ctrl-C / SIGTERM.
        Returns (first step, the callable that gives Alg. 1's losses)."""
        self.step, self.seconds0, self.saved_step = 0, 0.0, None
        if self.state is not None:
            opt.load_state_dict(self.state["optimizer"])
            self.step, self.seconds0 = self.state["step"], self.state.get("seconds", 0.0)
            self.saved_step = self.step
            print(f"resuming {self.folder} at step {self.step}/{self.total}")
        if self.opts.checkpointing and model.denoiser is not None:
            checkpoint_stages(model.denoiser)
        if self.opts.compile:
            compile_networks(model)
        fwd = model
        if self.world > 1:
            for net in (model.denoiser, model.seg):  # the nets with BatchNorm: the seg net, DRAEM+'s autoencoder
                if net is not None:
                    sync_batch_norm(net)
            fwd = nn.parallel.DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda"
                                                      else None)
        self.model, self.opt, self.keys = model, opt, None  # keys: the losses the model returns (at the first step)
        if self.rank == 0:
            kept = list(csv.reader(open(self.folder / "log.csv")))[1:] if self.step else []  # rows up to the checkpoint
            self.log = open(self.folder / "log.csv", "w", newline="")
            self.writer = csv.writer(self.log)
            self.writer.writerows([["step", "loss", "noise", "rec", "mask", "lr", "seconds"]]
                                  + [r for r in kept if int(r[0]) <= self.step])
        self.pending, self.last, self.stop, self.ended = [], {}, {}, None  # pending: read back in bulk, no sync per step
        self.keep = set(ints(self.opts.keep_ckpts))
        self.handlers = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self.step, fwd

    def on_signal(self, signum, _):
        self.stop["signal"] = signum
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C kills at once; checkpoints are atomic

    def batches(self, step):
        """The synthesizer's batches from `step` to the end, in one DataLoader for the whole run."""
        cuda = self.device.type == "cuda"
        workers = self.opts.workers if self.opts.workers >= 0 else (min(8, (os.cpu_count() or 2) - 1) if cuda else 0)
        loader = torch.utils.data.DataLoader(
            self.trainset, num_workers=workers, pin_memory=cuda, worker_init_fn=ignore_sigint,
            batch_sampler=self.sampler(len(self.trainset), self.per_batch, self.cfg.seed, step, self.total,
                                       self.rank, self.world), prefetch_factor=4 if workers else None)
        if self.rank == 0:
            n_params = sum(p.numel() for p in self.model.parameters())
            held = f", {len(self.held_out)} held out for the threshold" if self.held_out is not None else ""
            print(f"training {self.opts.data} ({len(self.trainset)} normal images{held}) on {self.device}: "
                  f"{n_params / 1e6:.1f}M parameters, {self.total} steps of {self.cfg.batch_size} images"
                  + (f" per rank ({self.world} ranks: global batch {self.cfg.batch_size * self.world})"
                     if self.world > 1 else "") + f", {workers} loader workers, run folder {self.folder}")
            self.warn_if_slow()
        self.t_start = self.t_print = time.time()
        self.step0 = step
        return loader

    def warn_if_slow(self, min_params=20e6):
        """On a CPU, a model of the paper's size (min_params or more) is timed on one step (forward and
        backward of a copy, on random images) before training, and the user is told how long the run would
        take and how to train on this machine. The run itself is untouched."""
        n_params = sum(p.numel() for p in self.model.parameters())
        if self.device.type != "cpu" or n_params < min_params:
            return
        side, g = self.opts.crop or self.cfg.img_size, torch.Generator().manual_seed(0)
        x0, mask, probe = torch.rand(2, 3, side, side, generator=g), torch.zeros(2, 1, side, side), copy.deepcopy(self.model)
        t0 = time.time()
        probe.train_loss(x0, mask, torch.tensor([0, 1]), torch.randn_like(x0))["total"].backward()  # 2 images
        passes = 2 if self.opts.variant == "authors" else 1  # the variant runs the denoiser twice per image
        seconds = (time.time() - t0) * self.cfg.batch_size / 2 * passes
        del probe
        print(f"note: a {n_params / 1e6:.0f}M-parameter model on a CPU: one step takes about {seconds:.0f} s, so "
              f"{self.total - self.step} steps would take about {fmt_time(seconds * (self.total - self.step))}. "
              "To train on this machine, add --preset cpu (a 2.5M-parameter model, minutes). Continuing as asked.",
              flush=True)

    def inputs(self, batch, step):
        """A batch's images, masks and anomaly-free images on the device in the training layout, and Alg. 1's noise
        generator for this step (resumable); random crops (--crop), the same window for an image and its source."""
        fmt = memory_format(self.opts, self.device)
        x0 = batch["image"].to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        mask = batch["mask"].to(self.device, non_blocking=True)
        source = batch["source"].to(self.device, non_blocking=True).contiguous(memory_format=fmt)
        g = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + step) * self.world + self.rank)
        if self.opts.crop:
            x0, mask, source = data.random_crops(x0, mask, self.opts.crop, g, source)
        return x0, mask, source, g

    def set_lr(self, opt, step):
        """The learning rate of 0-based `step` (lr_at), set in every group of opt; returns it."""
        lr = lr_at(step, self.cfg.lr, self.opts.lr_schedule, self.total)
        for group in opt.param_groups:
            group["lr"] = lr
        return lr

    def after_step(self, step, loss, lr):
        """Log, checkpoint, stop. Returns True when training must end now (signal or --max-minutes)."""
        now = time.time()
        self.step = step
        self.keys = self.keys or [k for k in ("total", "noise", "rec", "mask") if k in loss]
        self.pending.append((step, torch.stack([loss[k].detach() for k in self.keys]), lr,
                             self.seconds0 + now - self.t_start))
        if self.opts.max_minutes and self.seconds0 + now - self.t_start >= 60 * self.opts.max_minutes:
            self.stop["time"] = True
        if self.world > 1 and (step % 10 == 0 or step == self.total):  # every rank stops at the same step, alike
            flags = torch.tensor([float("signal" in self.stop), float("time" in self.stop)], device=self.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
            self.stop.update({k: self.stop.get(k, signal.SIGTERM) for k, f in zip(("signal", "time"), flags.tolist())
                              if f})
        halt = bool(self.stop) and (self.world == 1 or step % 10 == 0 or step == self.total)
        ckpt = step % self.opts.ckpt_every == 0 or step == self.total or halt
        if ckpt or step in self.keep:
            self.flush()  # never a checkpoint of non-finite weights
            if self.rank == 0 and ckpt:
                self.checkpoint(self.ckpt_path)
                self.saved_step = step
            if self.rank == 0 and step in self.keep:
                self.checkpoint(self.folder / f"ckpt_{step}.pt")
        if now - self.t_print >= self.opts.log_every or step == self.total or step == self.step0 + 1 or halt:
            self.flush()
            self.t_print, rate = now, (step - self.step0) / max(now - self.t_start, 1e-9)
            if self.rank == 0:
                print(f"step {step}/{self.total} (epoch {(step - 1) // self.steps_per_epoch + 1}) | "
                      + " ".join(f"{k} {v:.4f}" for k, v in self.last.items() if math.isfinite(v))
                      + f" | {rate * self.cfg.batch_size * self.world:.1f} img/s | "
                        f"eta {fmt_time((self.total - step) / max(rate, 1e-9))}", flush=True)
        if halt:
            self.ended = "signal" if "signal" in self.stop else "time"
        return halt

    def flush(self):
        """Copy the pending losses to the host (one sync), stop on a non-finite one, append them to log.csv."""
        if not self.pending:
            return
        values = torch.stack([v for _, v, _, _ in self.pending]).float().cpu()
        for (s, _, lr, sec), v in zip(self.pending, values.tolist()):
            if not math.isfinite(v[0]):
                where = (f"the last good checkpoint (step {self.saved_step}) is kept at {self.ckpt_path}"
                         if self.saved_step is not None else "no checkpoint was written yet")
                raise SystemExit(f"loss is {v[0]} at step {s}; stopped, {where}. Try a lower --lr or no --amp")
            if self.rank == 0:
                row = dict(zip(self.keys, v))
                self.writer.writerow([s] + [f"{row[k]:.6f}" if math.isfinite(row.get(k, math.nan)) else ""
                                            for k in ("total", "noise", "rec", "mask")] + [f"{lr:.6g}", f"{sec:.2f}"])
        self.pending.clear()
        self.last = dict(zip(self.keys, values[-1].tolist()))
        if self.rank == 0:
            self.log.flush()  # log.csv holds every row up to the last checkpoint

    def checkpoint(self, path, threshold=None):
        save_checkpoint(path, self.model, self.opt, self.step, self.cfg, self.opts, self.seconds(), threshold)

    def seconds(self):
        return self.seconds0 + time.time() - self.t_start

    def end(self):
        """After the loop: an interrupted run exits with how to resume; otherwise the training time is printed."""
        if self.ended == "signal":
            if self.rank == 0:
                again = " ".join(sys.argv) + ("" if "--resume" in sys.argv else " --resume")
                print(f"interrupted at step {self.step}/{self.total}: the checkpoint of step {self.step} is at "
                      f"{self.ckpt_path}. Resume with:\n  {again}", file=sys.stderr)
            raise SystemExit(128 + self.stop.get("signal", signal.SIGTERM))
        self.train_seconds = self.seconds()
        if self.rank == 0:
            print(f"trained {self.step - self.step0} steps in {fmt_time(self.train_seconds)}"
                  + (f" (--max-minutes {self.opts.max_minutes} reached at step {self.step}/{self.total})"
                     if self.ended == "time" else "") + "; evaluating the final model")

    def set_threshold(self, scores_of):
        """After training: the decision threshold from the held-out normal images' scores (scores_of: images
        (N,3,H,W) -> scores), stored in the checkpoint; None without a held-out slice."""
        if self.held_out is None:
            return None
        images = torch.stack([self.held_out[i]["image"] for i in range(len(self.held_out))])
        threshold = threshold_summary(scores_of(images), self.opts.threshold_quantile, self.cfg, self.opts)
        self.checkpoint(self.ckpt_path, threshold)
        return threshold

    def finish(self, res, threshold):
        """metrics.json of the final model: the evaluation's results (none without a test split), the threshold,
        the training time and steps."""
        if self.test is None:
            print(f"{self.opts.data}: no test split (a plain folder without --test): the threshold only")
        res.update(threshold=threshold, train_seconds=round(self.train_seconds, 1), steps=self.step)
        write_metrics(self.folder / "metrics.json", res, self.cfg, self.opts)
        if self.opts.compile:
            print("  " + compile_report() + " (training and evaluation)")


def lr_at(step, lr, schedule, total):
    """Learning rate of 0-based `step` of `total`: constant (paper) or a cosine decay to 0 at the last step."""
    return lr if schedule == "constant" else lr * 0.5 * (1 + math.cos(math.pi * step / total))


def ignore_sigint(_):
    """DataLoader workers leave Ctrl-C to the main process, which saves a checkpoint and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------- whole benchmarks

def train_benchmark(cfg, opts, classes, train):
    """train() and the final evaluation for every class of a benchmark root, one run folder each under
    runs/<root name>/<class>/. Finished classes are skipped, an interrupted one resumes; a class that fails
    does not stop the others. Under torchrun, rank r takes classes r, r + N, ... on its own device."""
    rank, world = torchrun_env()
    root = Path(opts.data.rstrip("/"))
    base = run_folder(opts, opts.ablation, benchmark=True)
    if opts.classes:
        wanted = set(opts.classes.split(","))
        unknown = wanted - {c.name for c in classes}
        if unknown:
            raise SystemExit(f"--classes: {', '.join(sorted(unknown))} not in {root} "
                             f"(it has {', '.join(c.name for c in classes)})")
        classes = [c for c in classes if c.name in wanted]
    base.mkdir(parents=True, exist_ok=True)
    listing = base / "benchmark.json"  # every class the table must show, finished or not
    known = json.loads(listing.read_text())["classes"] if listing.is_file() else []
    if rank == 0:
        atomic_write(listing, json.dumps({"root": str(root), "classes": sorted(set(known) | {c.name for c in classes})}))
    failed = []
    for cls in classes[rank::world]:
        run = base / cls.name
        if (run / "metrics.json").is_file():
            print(f"== {cls.name}: finished before, skipped ({run / 'metrics.json'})")
            continue
        resume = (run / "ckpt.pt").is_file()
        print(f"== {cls.name}: {'resuming' if resume else 'training'} in {run}", flush=True)
        try:
            train(cfg, replace(opts, data=str(cls), out=str(run)), resume=resume)
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):  # an interrupt: stop the whole benchmark
                raise
            print(f"== {cls.name} FAILED: {e.code}", file=sys.stderr, flush=True)
            failed.append(cls.name)
    with open(base / ".table.lock", "a") as f:  # the last rank to finish writes the complete table
        fcntl.flock(f, fcntl.LOCK_EX)
        print(write_table(base))
    if failed:
        raise SystemExit(f"{len(failed)} class(es) failed: {', '.join(failed)} (messages above); the others "
                         f"finished. Fix the data and run the same command again")


def write_table(folder):
    """table.md and table.csv of a benchmark folder (metrics.table); returns the markdown."""
    if not Path(folder).is_dir():
        raise SystemExit(f"{folder}: no such folder (a benchmark's runs, e.g. runs/VisA_20220922)")
    md, text = metrics.table(folder)
    atomic_write(Path(folder) / "table.md", md)
    atomic_write(Path(folder) / "table.csv", text)
    return md + f"\nwrote {Path(folder) / 'table.md'} and table.csv"


# ----------------------------------------------------------------------------- what eval, predict and export write

def threshold_summary(scores, quantile, cfg, opts):
    """The decision threshold (the quantile of held-out normal images' scores, at cfg's inference settings and
    opts.variant's algorithm) and those scores' summary."""
    s = np.asarray(scores, np.float64)
    t = {"value": float(np.quantile(s, quantile)), "quantile": quantile, "n_held_out": int(len(s)),
         "eval_t": cfg.eval_t, "top_k": cfg.top_k, "variant": opts.variant,
         "held_out_scores": {k: round(float(f(s)), 6) for k, f in
                             (("min", np.min), ("median", np.median), ("mean", np.mean), ("max", np.max))}}
    print(f"threshold {t['value']:.6f}: the {quantile} quantile of the scores of {len(s)} held-out normal images "
          f"(median {t['held_out_scores']['median']:.6f})")
    return t


def stored_threshold(state, cfg, opts, path, override=None):
    """(threshold or None, where it comes from): --threshold, else the checkpoint's when it was set with the
    same inference (algorithm, time steps, top-K) as this command's."""
    t = state.get("threshold")
    if override is not None:
        return override, "--threshold"
    if t is None:
        return None, f"{path} stores none (trained with --holdout 0 or by an earlier version); pass --threshold X"
    theirs, ours = (t.get("variant", "paper"), t["eval_t"], t["top_k"]), (opts.variant, cfg.eval_t, cfg.top_k)
    if theirs != ours:
        return None, (f"{path}'s threshold was set with the {theirs[0]} inference at t = {theirs[1]}, top-{theirs[2]}, "
                      f"not this command's {ours[0]} inference at t = {ours[1]}, top-{ours[2]}; pass --threshold X")
    return t, f"the {t['quantile']} quantile of {t['n_held_out']} held-out normal images' scores"


def read_split(test):
    """Every item of a test split read: (items, images (N,3,H,W), masks (N,H,W), labels (N,), known (N,): False for
    an anomalous image without a mask)."""
    items = [test[i] for i in range(len(test))]
    kept = sum(it.get("regions_kept", 0) for it in items)
    if kept:
        print(f"  {kept} defect region(s) smaller than a pixel at the image size kept as one pixel each")
    return (items, torch.stack([it["image"] for it in items]), np.stack([it["mask"][0].numpy() for it in items]),
            np.array([it["label"] for it in items]), np.array([it.get("has_mask", True) for it in items]))


def maps_without_restoration(model, images, opts, device):
    """The segmentation net's maps (N,H,W) and scores (N,) with x0_hat := x0: what it finds in x0 alone. One
    segmentation pass per batch."""
    fmt, out = memory_format(opts, device, inference=True), []
    with torch.inference_mode(), autocast(opts, device):
        for i in range(0, len(images), opts.eval_batch):
            x0 = images[i: i + opts.eval_batch].to(device).contiguous(memory_format=fmt)
            out.append(torch.sigmoid(model.segment(x0, x0).float())[:, 0].cpu())  # float32, as Alg. 2's maps
    maps = torch.cat(out)
    return maps.numpy(), model.image_score(maps).numpy()


def add_reliance(res, model, images, masks, labels, known, opts, device):
    """The segmentation net's reliance on the restoration, which every evaluation of a model with both networks
    reports: how much image AUROC, pixel AUROC and PRO drop when x0_hat is replaced by x0 itself."""
    plain_maps, plain_scores = maps_without_restoration(model, images, opts, device)
    res["without_restoration"] = plain = metrics.evaluate(plain_maps, masks, labels, plain_scores, pixel_images=known)
    res["reliance"] = {k: None if res[k] is None else res[k] - plain[k] for k in ("image_auroc", "pixel_auroc", "pixel_pro")}


def psnr(mse, labels, steps):
    """PSNR (dB) of the good images' restorations per time step: mse (N,K), labels (N,); None without good images."""
    if not (labels == 0).any():
        return None
    values = -10 * np.log10(np.maximum(mse[labels == 0], 1e-10)).mean(0)
    return {str(t): round(float(p), 2) for t, p in zip(steps, values)}


def report(res, items, scores, threshold, cfg, opts, device):
    """Adds the counts and the threshold's verdicts to an evaluation's results and prints them."""
    labels, known = np.array([it["label"] for it in items]), np.array([it.get("has_mask", True) for it in items])
    res.update(n_test_good=int((labels == 0).sum()), n_test_anomalous=int((labels == 1).sum()),
               n_test_without_mask=int((~known).sum()), regions_kept=sum(it.get("regions_kept", 0) for it in items))
    if threshold is not None:
        flag = lambda sel: float((scores[sel] >= threshold["value"]).mean()) if sel.any() else None
        res["flagged"] = {"threshold": threshold["value"], "good": flag(labels == 0), "anomalous": flag(labels == 1)}
    if res.get("restoration_psnr_good", 0) is None:
        del res["restoration_psnr_good"]
    print_metrics(res, cfg, opts, device)


class Progress:
    """A progress line with the rate and an ETA every `every` seconds: `  480/1150 test images, 2.1/s, eta 5m19s`."""
    def __init__(self, total, what, every):
        self.total, self.what, self.every = total, what, every
        self.t0 = self.t_print = time.time()

    def update(self, done, stream=None):
        now = time.time()
        if now - self.t_print >= self.every and done < self.total:
            self.t_print, rate = now, done / (now - self.t0)
            print(f"  {done}/{self.total} {self.what}, {rate:.1f}/s, eta {fmt_time((self.total - done) / rate)}",
                  file=stream or sys.stdout, flush=True)


def compiled(model, fn, opts, device):
    """fn (called as fn(model, ...)) compiled once per model with --compile (CUDA graphs on a GPU: the inference
    batch shape never changes), else fn itself."""
    if not opts.compile:
        return fn
    if "compiled_maps" not in model.__dict__:
        model.__dict__["compiled_maps"] = torch.compile(fn, mode="reduce-overhead" if device.type == "cuda" else None,
                                                        dynamic=False)
    return model.__dict__["compiled_maps"]


def print_metrics(res, cfg, opts, device):
    """The console report of an evaluation (metrics.json holds the same numbers)."""
    print(f"{res['data']} (t = {cfg.eval_t}, {res['n_test_good'] + res['n_test_anomalous']} test images: "
          f"{res['n_test_good']} good, {res['n_test_anomalous']} anomalous)")
    cols = [(name, k) for name, k in metrics.COLUMNS if res.get(k) is not None]
    print("  " + "  ".join(name for name, _ in cols) + "    FPS")
    print("  " + "  ".join(f"{100 * res[k]:>{len(name)}.1f}" for name, k in cols) + f"  {res['fps']:>5.1f}")
    if res.get("pixel_auroc") is None:
        print("  no masks for the anomalous test images: image metrics only")
    elif res.get("n_test_without_mask"):
        print(f"  pixel metrics and PRO over the {res['n_test_anomalous'] - res['n_test_without_mask']} anomalous "
              f"images with a mask (and the good ones); {res['n_test_without_mask']} have none")
    print(f"  FPS = test images/s through both networks at all time steps incl. the top-{cfg.top_k} score, "
          f"batch {opts.eval_batch} on {device}, after a warm-up, file reading excluded. F1 = F1-max")
    if "reliance" in res:
        print("  reliance on the restoration (drop with x0_hat := x0): " + ", ".join(
            f"{name} {100 * v:+.1f}" for name, v in zip(("image AUROC", "pixel AUROC", "PRO"), res["reliance"].values())
            if v is not None))
    if "restoration_psnr_good" in res:
        print("  restoration PSNR of the good test images (dB): "
              + ", ".join(f"{'t=' * t.isdigit()}{t} {p:.1f}" for t, p in res["restoration_psnr_good"].items()))
    if "flagged" in res:
        print(f"  threshold {res['flagged']['threshold']:.4f} flags {100 * res['flagged']['good']:.1f} % of the good "
              f"and {100 * res['flagged']['anomalous']:.1f} % of the anomalous test images")


def write_metrics(path, res, cfg, opts):
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in res.items()}
    clean["config"] = {**asdict(cfg), **asdict(opts)}
    atomic_write(path, json.dumps(clean, indent=2))
    print(f"  wrote {path}")


def save_panels(folder, items, images, restored, maps, t):
    folder.mkdir(parents=True, exist_ok=True)
    for it, img, rec, m in zip(items, images, restored, maps):
        panel = [data.to_uint8(img), data.to_uint8(rec), data.heatmap(m), data.to_uint8(it["mask"].expand(3, -1, -1))]
        data.save_png(folder / f"{it['defect']}_{Path(it['path']).stem}.png", np.concatenate(panel, axis=1))
    print(f"  wrote {len(items)} panels (input | restoration at t={t} | map | ground truth) to {folder}")


def eval_output(a, opts, cfg, path):
    """Where an evaluation writes: RUN/eval_<checkpoint>_<data>_t<t>[_alg2][_amp].json, or --json; never a
    run's own metrics.json, never an existing file given with --json. Also the folder name for its panels."""
    data_name = Path((a.test or a.data or opts.test or opts.data).rstrip("/")).name
    parts = ["eval", path.stem, data_name, "t" + cfg.eval_t.replace(",", "+")]
    parts += [p for p, on in (("alg2", getattr(a, "alg2", False)), ("amp", a.amp)) if on]
    name = "_".join(parts)
    out = Path(a.json) if a.json else path.parent / f"{name}.json"
    if out.name == "metrics.json" or (a.json and out.exists()):
        raise SystemExit(f"--json {out}: {'a run’s own result' if out.name == 'metrics.json' else 'exists'}; "
                         "pass a new file name")
    return out, path.parent / name


# ----------------------------------------------------------------------------- the command line

def parser(config_cls, doc):
    p = argparse.ArgumentParser(prog="diffusionad.py", description=doc, allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="Alg. 1: train on the normal images of --data, then evaluate", allow_abbrev=False)
    add_flags(t, config_cls, RunOptions)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    e = sub.add_parser("eval", help="Alg. 2 on the test split: metrics, FPS, reliance, optional map panels",
                       allow_abbrev=False)
    run_flags(e, "the most recent under runs/")
    e.add_argument("--data", help="test data (default: the training data)")
    e.add_argument("--test", default="", help="a labelled test folder (good/ and one folder per defect type)")
    e.add_argument("--test-masks", default="", help="masks of --test (default: TEST/masks)")
    e.add_argument("--save-maps", action="store_true", help="PNG panels: input | restoration | map | truth")
    e.add_argument("--json", help="where to write the metrics (default: <run>/eval_<checkpoint>_<data>_t<t>.json)")
    r = sub.add_parser("predict", help="score your own images, decide, write heatmaps", allow_abbrev=False)
    r.add_argument("inputs", nargs="+", help="image files or folders")
    run_flags(r, "the most recent run")
    r.add_argument("--out", help="new folder for heatmap PNGs (default: <run>/predictions-<date-time>)")
    r.add_argument("--csv", help="write the rows to this new file instead of stdout")
    r.add_argument("--threshold", type=float, help="anomalous when score >= this (default: the checkpoint's)")
    x = sub.add_parser("export", help="Alg. 2 as a torch.export program, loadable with torch alone",
                       allow_abbrev=False)
    run_flags(x, "the most recent run")
    x.add_argument("--out", required=True, help="new .pt2 file; its threshold goes to the .json beside it")
    m = sub.add_parser("import-authors", help="a run folder from a checkpoint of the authors' train.py "
                       "(params-best.pt / params-last.pt), for eval, predict, export and table", allow_abbrev=False)
    m.add_argument("params", help="the authors' checkpoint (read with weights_only=True)")
    m.add_argument("--out", required=True, help="new run folder")
    m.add_argument("--data", default="", help="the class it was trained on (ROOT/CLASS): recorded for eval, and its test "
                   "split evaluated now (metrics.json, for table)")
    m.add_argument("--threshold-from", default="", help="a folder of normal images the model was not trained on: the "
                   "--threshold-quantile quantile of their scores becomes the stored decision threshold")
    m.add_argument("--threshold-quantile", type=float, default=0.99)
    m.add_argument("--eval-batch", type=int, default=8)
    m.add_argument("--device", default="auto")
    m.add_argument("--log-every", type=float, default=10.0)
    sub.add_parser("bench", help="training and inference speed, plain and shipped paths side by side "
                   "(tools.py; bench --help)", add_help=False)
    s = sub.add_parser("table", help="the benchmark table of runs/<root name>: ours and the paper's", allow_abbrev=False)
    s.add_argument("folder", help="a benchmark's run folder, e.g. runs/VisA_20220922")
    return p


def run_flags(p, default):
    """The flags of the commands that load a trained run."""
    p.add_argument("--run", help=f"run folder (default: {default})")
    p.add_argument("--ckpt", help="checkpoint file (instead of --run)")
    p.add_argument("--eval-t", help="inference time steps, e.g. 100,200 (default: the run's)")
    p.add_argument("--eval-batch", type=int, help="images per inference batch (default: the run's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPUs; CPUs with native bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile Alg. 2 (CUDA graphs on a GPU)")
    p.add_argument("--log-every", type=float, help="seconds between progress lines")
    p.add_argument("--alg2", action="store_true", help="a run of the authors' variant (trained or imported): the "
                   "paper's Alg. 2 instead of their guided evaluation (at t = 100,200 unless --eval-t)")
