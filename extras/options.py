"""The flags: every field of the paper's Config (diffusionad.py) and of RunOptions below is one, its trailing comment
its help. Our recipe options, the authors' variant's settings, how a run is done, the CPU preset, and every check of
a value before any work."""
import argparse
import inspect
import re
from dataclasses import asdict, dataclass, fields, replace

import data
from extras.anomalies import FILLS, FOREGROUNDS, SHAPES
from extras.folders import image_shape, look
from extras.speed import inference_bf16, pick_device


def ints(value):
    """'32,16,8', a list or a tuple -> a tuple of ints ('' -> ()); ValueError otherwise."""
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(",") if v.strip())
    return tuple(int(v) for v in value)


def field_help(cls):
    """{field: its help} of a dataclass whose fields each end with `# help` (continued on comment-only lines)."""
    helps, name = {}, None
    for line in inspect.getsource(cls).splitlines():
        field_line = re.match(r"\s+(\w+): [^#]+#\s?(.*)", line)
        if field_line:
            name, helps[field_line[1]] = field_line[1], field_line[2]
        elif name and re.match(r"\s+#", line):
            helps[name] += " " + line.strip()[1:].strip()
        else:
            name = None
    return helps


@dataclass
class RunOptions:
    """Options beside the paper's Config: our recipe (each default the paper's behaviour, each measured in
    docs/RESULTS.md), Table 3's variants and the authors' released version, then how a run is done (data, folders,
    devices, speed, logging). All may change on --resume but data, holdout and the recipe's fields other than
    max_steps."""
    ablation: str = "none"  # Table 3 (extras/ablations.py): none (DiffusionAD) | seg-only (SegmentationAD) | ae
    # (DRAEM+: DRAEM's autoencoder, L2 + SSIM) | denoise-only (DenoisingAD)
    max_steps: int = 0  # if > 0, train this many steps instead of --epochs (CPU budgets)
    lr_schedule: str = "constant"  # constant (paper) | cosine: decay to 0 at the last step (--preset cpu)
    train_t: int = 0  # Alg. 1 draws t ~ U{0..train_t-1}; 0 = T (paper; --preset cpu: 300)
    crop: int = 0  # if > 0, train on crops of this side that keep part of the anomaly; evaluate whole images
    anomaly_shape: str = "perlin"  # synthetic anomaly masks: perlin (paper) | curves (thin strokes) | mixed (half
    # each) | small (PCB-sized spots and strokes) (extras/anomalies.py)
    anomaly_fill: str = "blend"  # synthetic anomaly content: blend (Eq. 9, paper) | invert (1 - N inside the mask:
    # the other material of a binarised image such as a PCB scan)
    variant: str = "paper"  # which DiffusionAD: paper (Alg. 1 and 2) | authors (their released, norm-guided code,
    # extras/authors.py: batch 16, 3000 epochs and eval-t 200,400 unless given)
    guide_t: int = 300  # --variant authors: normal t ~ U{0..guide_t-1}, noisier t ~ U{guide_t..T-1} (less_t_range)
    condition_w: float = 1.0  # --variant authors: the guidance weight (their condition_w)
    seg_lr: float = 1e-5  # --variant authors: the seg net's Adam rate (their seg_lr), on a cosine wave of period
    # 2 * seg_lr_period steps (their CosineAnnealingLR, stepped every iteration)
    seg_lr_period: int = 10  # --variant authors: T_max of that CosineAnnealingLR
    data: str = "synthetic"  # ROOT/CLASS (MVTec AD, VisA raw or 1cls, DAGM 2007), a plain folder of normal images,
    # or 'synthetic'; a whole benchmark ROOT trains and evaluates every class in turn
    test: str = ""  # a labelled test folder (good/ and one folder per defect type; masks, where there are any, in
    # TEST/masks/<type>/<stem>.png or --test-masks) for a plain --data folder, or instead of a data set's own
    test_masks: str = ""  # masks of --test: a folder of <type>/<stem>.png or <type>/<stem>_mask.png (TEST/masks)
    out: str = ""  # run folder (default runs/<data set>-<class>; for a benchmark ROOT, runs/<root name>)
    classes: str = ""  # with a benchmark ROOT: only these classes, e.g. candle,pcb1 (default: all)
    holdout: float = 0.1  # fraction of the normal training images (at least 5) kept out of training to set the
    # decision threshold; 0 = train on all of them (paper), no threshold
    threshold_rule: str = "synthetic"  # how the held-out images set the threshold: synthetic (the F1 optimum between
    # them and synthetic anomalies made from them, floored) | quantile (--threshold-quantile) (extras/thresholds.py)
    threshold_quantile: float = 0.99  # the quantile rule's quantile of the held-out normal images' scores
    calibrate: str = ""  # a labelled folder (good/ and defect folders, never the test split): the threshold at the
    # F1 optimum of its images' scores, instead of the held-out images' rule
    device: str = "auto"  # auto (CUDA when present; cuda:LOCAL_RANK under torchrun) | cpu | cuda | cuda:N
    amp: bool = False  # bf16 autocast (GPUs; CPUs only with native bf16: AMX or AVX512-BF16); --no-amp: float32
    # throughout, also where --preset cpu would infer in bf16
    eval_amp: bool = False  # bf16 autocast for inference alone (evaluation, the threshold, eval and predict of the
    # run) where the device has native bf16, float32 elsewhere (--preset cpu: on)
    compile: bool = False  # torch.compile both networks (training) and Alg. 2 (inference; CUDA graphs on a GPU)
    checkpointing: bool = False  # activation checkpointing of the denoiser's stages in training: recomputed in the
    # backward pass instead of kept (less memory, more time)
    workers: int = -1  # DataLoader worker processes for the synthesizer; -1 = auto (GPU: min(8, cores - 1), CPU: 0)
    eval_batch: int = 8  # test images per inference batch
    max_minutes: float = 0.0  # if > 0, end training after this many minutes (resumed runs included) with a
    # checkpoint and the final evaluation
    ckpt_every: int = 500  # steps between checkpoints (always one at the end)
    keep_ckpts: tuple = ()  # steps whose checkpoint is also kept as ckpt_<step>.pt, e.g. 600,1200 (for curves)
    log_every: float = 10.0  # seconds between progress lines


RECIPE = ("ablation", "max_steps", "lr_schedule", "train_t", "crop", "anomaly_shape", "anomaly_fill", "variant",
          "guide_t", "condition_w", "seg_lr", "seg_lr_period")
AUTHORS = ("variant", "guide_t", "condition_w", "seg_lr", "seg_lr_period")
# What a resumed run may change: the length of training and Alg. 2's settings; and how the run is done but its data.
RESUMABLE = ("epochs", "max_steps", "eval_t", "top_k")
# --preset cpu, one recipe for 2 CPU cores (docs/RESULTS.md): the authors' networks made small (2.5M parameters),
# trained on 64-px crops that keep the synthetic anomaly, evaluated on whole images at their median short side rounded
# down to a multiple of 32, 64 to 256 px (cpu_preset), with a fully convolutional denoiser; half of the synthetic masks
# thin curves; t from 0..299 (the authors' later code); 5e-4 decayed to 0 (a constant rate could leave the last
# model in a bad state); inference in bf16 where the device has it natively (the same metrics at 2-2.4x on a CPU
# with AVX512-BF16; training stays float32, which bf16 does not speed up at 64-px crops). Binarised images (a PCB
# scan) get defects of the other material (BINARISED). Flags win.
CPU_PRESET = dict(base_channels=16, num_res_blocks=1, channel_mult=(1, 2, 4), attn_resolutions=(), seg_channels=16,
                  crop=64, max_steps=3000, lr=5e-4, lr_schedule="cosine", eval_batch=4, workers=0, train_t=300,
                  anomaly_shape="mixed", eval_amp=True)
# Binarised images: a defect is the other material, never a grey blend, small as PCB defects, anywhere; its full
# contrast survives little noise, so t up to 600 and inference at 200, 400 (the PCB recipe, docs/RESULTS.md).
BINARISED = dict(anomaly_shape="small", anomaly_fill="invert", foreground="none", train_t=600, eval_t=(200, 400))
# The authors' released variant: their args1.json where it differs from the paper's defaults (flags given win).
AUTHORS_PRESET = dict(batch_size=16, epochs=3000, eval_t=(200, 400), train_t=0)  # t: by --guide-t
CHOICES = {"ablation": ("none", "seg-only", "ae", "denoise-only"), "lr_schedule": ("constant", "cosine"),
           "variant": ("paper", "authors"), "anomaly_shape": SHAPES, "anomaly_fill": FILLS, "foreground": FOREGROUNDS,
           "threshold_rule": ("synthetic", "quantile")}


def flag(name):
    return "--" + name.replace("_", "-")


def show(size):
    """A size as its flag is written: 256, or 64,160."""
    return ",".join(map(str, data.hw(size))) if not isinstance(size, int) else str(size)


def parse_ints(text):
    """argparse's type of the comma-separated fields: a clear message for a bad value."""
    try:
        return ints(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None


def parse_size(text):
    """--img-size: a side S (square images), or HEIGHT,WIDTH; S,S is S."""
    try:
        values = ints(text)
    except ValueError:
        values = ()
    if len(values) not in (1, 2):
        raise argparse.ArgumentTypeError(f"must be a side S or HEIGHT,WIDTH, got {text!r}")
    return values[0] if len(set(values)) == 1 else values


def add_flags(parser, config_cls):
    """One flag per field of config_cls and RunOptions, with its help and default, in --help groups: the paper's
    method, our recipe and Table 3, the authors' version, how the run is done; and --preset."""
    helps = {**field_help(config_cls), **field_help(RunOptions)}
    groups = [(f"the paper's method ({config_cls.__name__})", fields(config_cls)),
              ("our recipe options and Table 3 (the paper's behaviour by default)",
               [f for f in fields(RunOptions) if f.name in RECIPE and f.name not in AUTHORS]),
              ("the authors' released version (extras/authors.py)",
               [f for f in fields(RunOptions) if f.name in AUTHORS]),
              ("how the run is done (RunOptions)", [f for f in fields(RunOptions) if f.name not in RECIPE])]
    for title, group in groups:
        g = parser.add_argument_group(title)
        for f in group:
            default = ",".join(map(str, f.default)) if f.type is tuple else f.default
            kind, metavar = ((parse_size, "S|H,W") if f.name == "img_size" else (parse_ints, "INTS") if f.type is tuple
                             else (f.type, f.type.__name__.upper()))
            if f.type is bool:
                g.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=helps[f.name])
            else:
                g.add_argument(flag(f.name), type=kind, default=argparse.SUPPRESS, metavar=metavar,
                               help=f"{helps[f.name]} (default: {default!r})")
    parser.add_argument("--preset", choices=["paper", "cpu"], default="paper",
                        help="'cpu': a small model for 2 CPU cores (README quickstart); explicit flags still win")


def from_flags(args, config_cls):
    """Parsed flags -> (Config, RunOptions): the preset's values, then the flags given; without --img-size, the
    shape of the images where they share one that is not square (folders.image_shape)."""
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in fields(config_cls) + fields(RunOptions)}}
    cpu = getattr(args, "preset", "paper") == "cpu"
    side, binarised = look(given.get("data", RunOptions.data)) if cpu else (None, False)
    preset = cpu_preset(side, binarised) if cpu else {}
    if given.get("variant") == "authors":
        preset.update(AUTHORS_PRESET)
    cfg, opts = config_and_options({**preset, **given}, config_cls)
    if given.get("amp") is False and "eval_amp" not in given:  # --no-amp: float32 throughout
        opts = replace(opts, eval_amp=False)
    if "img_size" not in given:  # a multiple of 32 (the seg net) and of the denoiser's 2^(levels - 1)
        multiple = max(32, 2 ** (len(cfg.channel_mult) - 1))
        try:
            cfg = replace(cfg, img_size=image_shape(opts.data, cfg.img_size, multiple))
        except ValueError as e:
            raise SystemExit(str(e))
    if cpu:  # what it chose, as the run will use it (flags given win)
        print(f"--preset cpu: images at {show(cfg.img_size)} px" + (f" (their median short side {side}, 64-256)"
              if side else "") + (f", {opts.crop}-px crops" if opts.crop else "")
              + (f", binarised images: {opts.anomaly_shape} defects, fill {opts.anomaly_fill}, t up to {opts.train_t}, "
                 f"inference at {', '.join(map(str, cfg.eval_t))}" if binarised else "")
              + (", inference in bf16 (native on this device; --no-amp: float32)" if bf16_here(opts) else ""))
    return cfg, opts


def bf16_here(opts):
    """Whether the run infers in bf16 by --eval-amp alone on the device it names (False for a --device that
    check_flags refuses next)."""
    try:
        return not opts.amp and inference_bf16(opts, pick_device(opts))
    except (RuntimeError, SystemExit):
        return False


def cpu_preset(side, binarised):
    """CPU_PRESET for images of median short side `side` (None: unknown, 64 px) that are binarised or not
    (folders.look): the size is side rounded down to a multiple of 32 within 64-256."""
    preset = {**CPU_PRESET, "img_size": 64 if side is None else min(256, max(64, side // 32 * 32))}
    return {**preset, **(BINARISED if binarised else {})}


def config_and_options(values, config_cls):
    """A flat dict of fields (a checkpoint's "config", or flags) -> (Config, RunOptions); comma-separated fields as
    tuples."""
    values = {k: ints(v) if k in ("channel_mult", "attn_resolutions", "eval_t", "keep_ckpts") else v
              for k, v in values.items()}
    if not isinstance(values.get("img_size", 0), int):  # (H, W) as a list in config.json
        values["img_size"] = parse_size(",".join(map(str, values["img_size"])))
    names = {f.name for f in fields(config_cls)}
    return (config_cls(**{k: v for k, v in values.items() if k in names}),
            RunOptions(**{k: v for k, v in values.items() if k not in names}))


def value_problems(cfg, opts):
    """Each flag whose value is out of its range, one line each."""
    both = {**asdict(cfg), **asdict(opts)}
    positive = ("timesteps", "base_channels", "num_res_blocks", "num_heads", "seg_channels", "epochs",
                "eval_batch", "top_k", "ckpt_every")
    problems = [f"{flag(n)} must be >= 1, got {both[n]}" for n in positive if both[n] < 1]
    problems += [f"{flag(n)} must be >= 0, got {both[n]}" for n in ("max_steps", "crop", "max_minutes", "dropout")
                 if both[n] < 0]
    problems += [f"{flag(n)} must be > 0, got {both[n]}" for n in ("lr", "log_every") if not both[n] > 0]
    if not 0 <= opts.holdout < 1:
        problems.append(f"--holdout must be in [0, 1), got {opts.holdout}")
    if not 0 <= opts.threshold_quantile <= 1:
        problems.append(f"--threshold-quantile must be in [0, 1], got {opts.threshold_quantile}")
    if opts.workers < -1:
        problems.append(f"--workers must be >= 0, or -1 for auto, got {opts.workers}")
    if not (opts.device in ("auto", "cpu", "cuda") or opts.device.startswith("cuda:") and opts.device[5:].isdigit()):
        problems.append(f"--device must be auto, cpu, cuda or cuda:N, got {opts.device!r}")
    problems += [f"{flag(n)} must be one of {', '.join(allowed)}, got {both[n]!r}" for n, allowed in CHOICES.items()
                 if both[n] not in allowed]
    if not 0 < cfg.beta_start < cfg.beta_end < 1:
        problems.append(f"need 0 < --beta-start < --beta-end < 1, got {cfg.beta_start}, {cfg.beta_end}")
    if not 0 <= opts.train_t <= cfg.timesteps:
        problems.append(f"--train-t must be in [0, --timesteps {cfg.timesteps}] (0 = T), got {opts.train_t}")
    if not cfg.eval_t or any(not 0 <= t < cfg.timesteps for t in cfg.eval_t):
        problems.append(f"--eval-t needs time steps in [0, {cfg.timesteps - 1}] (t = 0..T-1), got {cfg.eval_t}")
    return problems


def combination_problems(cfg, opts, levels):
    """Each flag that does not fit the others, one line each; levels: the denoiser's number of levels."""
    problems = []
    if opts.variant == "paper" and (cfg.batch_size < 2 or cfg.batch_size % 2):
        problems.append(f"--batch-size must be even (half normal, half synthetic), got {cfg.batch_size}")
    if opts.checkpointing and opts.ablation in ("seg-only", "ae"):
        problems.append(f"--checkpointing applies to the denoising UNet's stages; --ablation {opts.ablation} has none")
    if opts.variant == "authors":
        if not 0 < opts.guide_t < cfg.timesteps:
            problems.append(f"--guide-t must be in [1, {cfg.timesteps - 1}], got {opts.guide_t}")
        if len(cfg.eval_t) != 2:
            problems.append(f"--variant authors evaluates with one guided restoration: --eval-t NORMAL,NOISIER "
                            f"(theirs: 200,400), got {cfg.eval_t}")
        if opts.ablation != "none":
            problems.append(f"--variant authors trains both networks: drop --ablation {opts.ablation}")
        if opts.train_t:
            problems.append("--variant authors draws its time steps by --guide-t: drop --train-t")
        if not (opts.seg_lr > 0 and opts.seg_lr_period >= 1):
            problems.append(f"need --seg-lr > 0 and --seg-lr-period >= 1, got {opts.seg_lr}, {opts.seg_lr_period}")
    multiple = max(32, 2 ** (levels - 1))  # the seg net pools 5 times, the denoiser levels - 1 times
    bad = [s for s in data.hw(cfg.img_size) if s < 1 or s % multiple]
    if bad:
        near = "; ".join(f"{s} -> {max(s // multiple, 1) * multiple} or {(max(s // multiple, 0) + 1) * multiple}"
                         for s in bad)
        problems.append(f"--img-size {show(cfg.img_size)}: every side must be a multiple of {multiple} (32 for the seg "
                        f"net, 2^(levels - 1) for --channel-mult's {levels} levels); the nearest that can: {near}")
    heads = ("--num-head-channels", cfg.num_head_channels) if cfg.num_head_channels > 0 else ("--num-heads",
                                                                                              cfg.num_heads)
    if cfg.base_channels % heads[1]:
        problems.append(f"--base-channels {cfg.base_channels} must be divisible by {heads[0]} {heads[1]}")
    if opts.crop and (opts.crop > min(data.hw(cfg.img_size)) or opts.crop % multiple):
        problems.append(f"--crop {opts.crop} must be <= every side of --img-size and a multiple of {multiple}")
    return problems


def check_flags(cfg, opts, channel_mult):
    """Every bad value at once, before any work: one SystemExit naming each flag. channel_mult: the model's function
    (Config -> level multipliers), which raises ValueError for a size it has no default for."""
    problems = value_problems(cfg, opts)
    try:
        problems += combination_problems(cfg, opts, len(channel_mult(cfg)))
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise SystemExit("bad configuration:\n  " + "\n  ".join(problems))
    return cfg, opts
