"""DiffusionAD in one file: anomaly detection as noise-to-norm.

Zhang et al., "DiffusionAD: Norm-guided One-step Denoising Diffusion for Anomaly Detection" (2023).
A query image x0 is corrupted with Gaussian noise (Eq. 2), a denoising UNet predicts the noise and a
flawless approximation x0_hat is restored in ONE step (Eq. 5); a segmentation UNet compares
cat(x0, x0_hat) and outputs a pixel-wise anomaly map. Training (Alg. 1) uses normal images plus
synthetic anomalies (data.py); inference (Alg. 2) averages the maps at t = 100 and t = 200 and scores an
image by the mean of its top-50 map values.

Read top to bottom: Config -> schedule (Eq. 1-2) -> denoiser -> segmentation net -> losses (Eq. 6-8)
-> Alg. 1 (train) -> Alg. 2 (inference, evaluation) -> CLI.

Deviations from the paper and the authors' code (also in README.md):
- beta schedule: linear from 1e-4 to 0.02 (DDPM and the authors' code); the paper's text reads 1e-2.
- L_noise (Eq. 6) is averaged over the normal half of the batch only (authors' code): an eps target on
  a synthetic anomaly would teach the denoiser to reproduce the anomaly. L_mask covers the whole batch.
- Time steps are 1-based as in the paper (t in [1, T], alpha_bar_0 = 1); inference at t = 100 uses
  alpha_bar_100. The authors' code indexes from 0 (its "100" is the paper's t = 101).
- The focal loss (Eq. 7) is computed from logits (focusing parameter 2, no alpha) for stability.
- x0_hat is clamped to the pixel range before the segmentation net (authors' code). Unclamped, x0_hat at
  large t (divided by sqrt(alpha_bar_t) ~ 0.006) fills BatchNorm's running statistics with huge values
  and the maps at t = 100, 200 come out flat (README, Results).
- PRO is computed exactly (metrics.py), not with the authors' 1000 sampled thresholds.
- Thin defects: a ground-truth region that vanishes when its mask is resized keeps one pixel (data.py).
- Under torchrun the seg net's BatchNorm normalises over the global batch (our all-reduce; CPUs too).
- Options of ours, off by default (README, Results): --crop trains on crops that keep the anomaly (whole
  images at eval), with --attn-resolutions '' for a fully convolutional denoiser; --train-t N draws Alg. 1's
  t from 1..N (the authors' later code: N < 300; --preset cpu uses 300); --lr-schedule cosine (decay to 0 at
  the last step instead of the paper's constant rate; --preset cpu uses it); --seg-grad none (x0_hat detached
  before the seg net); eval --bn-recal N; --anomaly-shape curves|mixed (thin scratch-like synthetic masks).
"""
import argparse
import csv
import fcntl
import functools
import json
import math
import os
import resource
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


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    """Every field is a CLI flag (`img_size` -> `--img-size`). Defaults are the paper's (Sec. 4.2)."""
    data: str = arg("synthetic", "dataset ROOT/CLASS (MVTec AD, VisA raw or 1cls, DAGM 2007) or 'synthetic'; "
                    "a whole benchmark ROOT trains and evaluates every class in turn")
    out: str = arg("", "run folder (default runs/<dataset>-<class>; for a benchmark ROOT, runs/<root name>)")
    classes: str = arg("", "with a benchmark ROOT: only these classes, e.g. candle,pcb1 (default: all)")
    img_size: int = arg(256, "image side, Sec. 4.2")
    crop: int = arg(0, "if > 0, train on crops of this side that keep part of the anomaly; eval whole images (ours)")
    pixel_range: str = arg("0,1", "range fed to the networks, '0,1' or '-1,1' (authors' code: 0,1)")
    foreground: str = arg("auto", "synthesis foreground: auto|object|texture|none (data.py, Sec. 3.3)")
    texture_dir: str = arg("", "anomaly source textures such as DTD; empty = self-augmentation (Sec. 3.3)")
    anomaly_shape: str = arg("perlin", "synthetic anomaly masks: perlin (paper) | curves (thin scratch-like "
                             "strokes) | mixed (half each) | small (PCB-sized spots and strokes) (ours; data.py)")
    anomaly_fill: str = arg("blend", "synthetic anomaly content: blend (Eq. 9, paper) | invert (1 - N inside the mask: "
                            "the other material of a binarised image such as a PCB scan; ours)")
    timesteps: int = arg(1000, "T, Sec. 4.2")
    train_t: int = arg(0, "Alg. 1 draws t ~ U{1..train_t}; 0 = T (paper; the authors' later code: < 300)")
    beta_start: float = arg(1e-4, "linear schedule start, DDPM / authors' code (paper text: 1e-2)")
    beta_end: float = arg(0.02, "linear schedule end, Sec. 4.2")
    base_channels: int = arg(128, "denoiser width, Sec. 4.2")
    channel_mult: str = arg("", "denoiser level multipliers; empty = by size, 1,1,2,2,4,4 at 256 (authors' code)")
    num_res_blocks: int = arg(2, "residual blocks per level (authors' code)")
    attn_resolutions: str = arg("32,16,8", "self-attention resolutions, Sec. 4.2 (and the middle block); '' = no "
                                "attention, a fully convolutional denoiser (ours: for --crop training)")
    num_heads: int = arg(4, "attention heads, Sec. 4.2")
    dropout: float = arg(0.0, "denoiser dropout (authors' code)")
    seg_channels: int = arg(64, "segmentation net base width (DRAEM's discriminative net)")
    gamma: float = arg(5.0, "focal-loss weight in L_mask, Eq. 7 / Sec. 4.2")
    batch_size: int = arg(6, "images per step, half normal half synthetic: 3 + 3, Sec. 4.2")
    lr: float = arg(1e-4, "Adam learning rate, one optimizer over both networks, Sec. 4.2")
    lr_schedule: str = arg("constant", "constant (paper) | cosine: decay to 0 at the last step of "
                             "max_steps/epochs (ours; a resume with more steps stretches the decay)")
    seg_grad: str = arg("full", "the mask loss's gradient into the denoiser through Eq. 5: full (paper) | none (ours)")
    denoiser_warmup: int = arg(0, "the first N steps train the denoiser alone (L_noise), then Eq. 8's joint loss (ours)")
    holdout: float = arg(0.1, "fraction of the normal training images kept out of training to set the decision "
                         "threshold (ours); 0 = train on all of them (paper), no threshold")
    epochs: int = arg(500, "training epochs, Sec. 4.2")
    max_steps: int = arg(0, "if > 0, train this many steps instead of `epochs` (ours, for CPU budgets)")
    eval_t: str = arg("100,200", "inference time steps whose maps are averaged, Sec. 4.2 / Table 4")
    top_k: int = arg(50, "image score = mean of the top-K map values, Sec. 3.4")
    eval_batch: int = arg(8, "test images per inference batch (ours)")
    ablation: str = arg("none", "Table 3: none | seg-only | ae (DRAEM+) | denoise-only")
    seed: int = arg(0, "seed for weights, batches, training noise and evaluation noise")
    device: str = arg("auto", "auto (CUDA when present; cuda:LOCAL_RANK under torchrun) | cpu | cuda | cuda:N")
    amp: bool = arg(False, "bf16 autocast (GPUs; CPUs only with native bf16: AMX or AVX512-BF16)")
    compile: bool = arg(False, "torch.compile both networks (training) and Alg. 2 (inference; CUDA graphs on a GPU)")
    workers: int = arg(-1, "DataLoader worker processes for the synthesizer; -1 = auto (GPU: min(8, cores - 1), CPU: 0)")
    max_minutes: float = arg(0.0, "if > 0, end training after this many minutes (resumed runs included) with a "
                             "checkpoint and the normal final evaluation (ours)")
    ckpt_every: int = arg(500, "steps between checkpoints (always one at the end)")
    keep_ckpts: str = arg("", "steps whose checkpoint is also kept as ckpt_<step>.pt, e.g. 600,1200 (curves; ours)")
    log_every: float = arg(10.0, "seconds between progress lines")


# Small model for a 2-core CPU (README quickstart); flags given on the command line win. train_t=300: Alg. 1's t
# from 1..300, as the authors' later code (README, Results: cleaner restorations, better pixel metrics).
# lr_schedule=cosine: with a constant 5e-4 the last steps' updates could leave the final model in a bad
# state (README, Results: DAGM seed 1, 79.2 -> 98.5 image AUROC with the same batches).
CPU_PRESET = dict(img_size=64, base_channels=16, num_res_blocks=1, channel_mult="1,2,4", attn_resolutions="16",
                  seg_channels=16, max_steps=900, lr=5e-4, lr_schedule="cosine", eval_batch=16, workers=0,
                  train_t=300)
# Fields that may change when a run is resumed; all others define the networks or the training problem.
FREE_FIELDS = ("out", "classes", "epochs", "max_steps", "max_minutes", "eval_t", "top_k", "eval_batch", "device",
               "amp", "compile", "workers", "ckpt_every", "keep_ckpts", "log_every")
# Options of earlier versions and their "off" values: older checkpoints with them off still load.
RETIRED = {"ema": 0.0, "bn_recal": 0, "warmup": 0, "seg_norm": "batch"}
ABLATIONS = ("none", "seg-only", "ae", "denoise-only")
CHOICES = {"ablation": ABLATIONS, "pixel_range": ("0,1", "-1,1"), "seg_grad": ("full", "none"),
           "lr_schedule": ("constant", "cosine"), "anomaly_shape": data.SHAPES, "anomaly_fill": data.FILLS}
# Fields added after checkpoints were written, with the value those checkpoints were trained with.
LEGACY = {"holdout": 0.0}


def ints(text):
    return tuple(int(v) for v in str(text).split(",") if v.strip())


def channel_mult(cfg):
    if cfg.channel_mult:
        return ints(cfg.channel_mult)
    by_size = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}  # authors' code
    if cfg.img_size not in by_size:
        raise SystemExit(f"no default --channel-mult for --img-size {cfg.img_size}; pass one, e.g. 1,2,2,4")
    return by_size[cfg.img_size]


def check_config(cfg):
    """Every bad value at once, before any work: SystemExit naming each flag."""
    problems = []
    for name in ("channel_mult", "attn_resolutions", "eval_t", "keep_ckpts"):
        try:
            ints(getattr(cfg, name))
        except ValueError:
            problems.append(f"--{name.replace('_', '-')} must be comma-separated integers, got {getattr(cfg, name)!r}")
    if problems:
        raise SystemExit("bad configuration:\n  " + "\n  ".join(problems))
    mult = channel_mult(cfg)
    positive = ("img_size", "timesteps", "base_channels", "num_res_blocks", "num_heads", "seg_channels", "epochs",
                "eval_batch", "top_k", "ckpt_every")
    problems += [f"--{n.replace('_', '-')} must be >= 1, got {getattr(cfg, n)}" for n in positive if getattr(cfg, n) < 1]
    problems += [f"--{n.replace('_', '-')} must be >= 0, got {getattr(cfg, n)}" for n in
                 ("max_steps", "crop", "max_minutes", "dropout", "denoiser_warmup") if getattr(cfg, n) < 0]
    if not 0 <= cfg.holdout < 1:
        problems.append(f"--holdout must be in [0, 1), got {cfg.holdout}")
    if cfg.denoiser_warmup and cfg.ablation not in ("none", "ae"):
        problems.append(f"--denoiser-warmup needs both networks; --ablation {cfg.ablation} has one")
    problems += [f"--{n.replace('_', '-')} must be > 0, got {getattr(cfg, n)}" for n in ("lr", "log_every")
                 if not getattr(cfg, n) > 0]
    if cfg.workers < -1:
        problems.append(f"--workers must be >= 0, or -1 for auto, got {cfg.workers}")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:") and cfg.device[5:].isdigit()):
        problems.append(f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            problems.append(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    if cfg.batch_size < 2 or cfg.batch_size % 2:
        problems.append(f"--batch-size must be even (half normal, half synthetic), got {cfg.batch_size}")
    if cfg.img_size % 32 or cfg.img_size % 2 ** (len(mult) - 1):
        problems.append(f"--img-size {cfg.img_size} must be divisible by 32 and by 2^(levels-1) of --channel-mult")
    if cfg.base_channels % cfg.num_heads:
        problems.append(f"--base-channels {cfg.base_channels} must be divisible by --num-heads {cfg.num_heads}")
    if not 0 < cfg.beta_start < cfg.beta_end < 1:
        problems.append(f"need 0 < --beta-start < --beta-end < 1, got {cfg.beta_start}, {cfg.beta_end}")
    if not 0 <= cfg.train_t <= cfg.timesteps:
        problems.append(f"--train-t must be in [0, --timesteps {cfg.timesteps}] (0 = T), got {cfg.train_t}")
    if cfg.crop and (cfg.crop > cfg.img_size or cfg.crop % 2 ** (len(mult) - 1) or cfg.crop % 32):
        problems.append(f"--crop {cfg.crop} must be <= --img-size and divisible by 32 and by 2^(levels-1)")
    bad_t = [t for t in ints(cfg.eval_t) if not 1 <= t <= cfg.timesteps]
    if bad_t or not ints(cfg.eval_t):
        problems.append(f"--eval-t needs time steps in [1, {cfg.timesteps}], got {cfg.eval_t!r}")
    if problems:
        raise SystemExit("bad configuration:\n  " + "\n  ".join(problems))
    return cfg


# ----------------------------------------------------------------------------- schedule (Eq. 1-2)

def make_schedule(cfg):
    """Linear betas in float64, stored as float32; index t is the paper's t, with alpha_bar_0 = 1."""
    betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.timesteps, dtype=torch.float64)  # Eq. (1)
    alphas_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - betas, 0)])
    return alphas_bar.sqrt().float(), (1.0 - alphas_bar).sqrt().float()


def extract(a, t):
    """a[t] shaped (B, 1, 1, 1) to broadcast over images."""
    return a.to(t.device)[t].view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------- denoiser eps_theta(x_t, t)

def norm(ch):
    return nn.GroupNorm(math.gcd(32, ch), ch)


def zero(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer steps t (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim, dropout):
        super().__init__()
        self.in_layers = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(norm(cout), nn.SiLU(), nn.Dropout(dropout),
                                        zero(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb(emb)[:, :, None, None]  # time step added in every block
        return self.skip(x) + self.out_layers(h)


class Attention(nn.Module):
    def __init__(self, ch, heads):
        super().__init__()
        self.heads, self.norm = heads, norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, 3, self.heads, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, HW, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        return x + self.proj(h.transpose(-1, -2).reshape(B, C, H, W))


class Resample(nn.Module):
    def __init__(self, ch, up):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(ch, ch, 3, stride=1 if up else 2, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else x)


class Step(nn.Module):
    """One UNet stage: layers applied in order, residual blocks also receive the time embedding."""
    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x, emb):
        for layer in self.layers:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class DenoisingUNet(nn.Module):
    """Guided-diffusion-style UNet: (B,3,H,W), (B,) -> (B,3,H,W)."""
    def __init__(self, cfg):
        super().__init__()
        ch, mult, attn = cfg.base_channels, channel_mult(cfg), set(ints(cfg.attn_resolutions))
        block = lambda cin, cout: ResBlock(cin, cout, 4 * ch, cfg.dropout)
        self.base = ch
        self.time_embed = nn.Sequential(nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))
        self.inp = nn.Conv2d(3, ch, 3, padding=1)
        self.down, skips, cur, res = nn.ModuleList(), [ch], ch, cfg.img_size
        for level, m in enumerate(mult):
            for _ in range(cfg.num_res_blocks):
                layers = [block(cur, m * ch)] + ([Attention(m * ch, cfg.num_heads)] if res in attn else [])
                self.down.append(Step(*layers))
                cur = m * ch
                skips.append(cur)
            if level < len(mult) - 1:
                self.down.append(Step(Resample(cur, up=False)))
                skips.append(cur)
                res //= 2
        mid_attn = [Attention(cur, cfg.num_heads)] if attn else []  # none: fully convolutional (ours, for --crop)
        self.mid = Step(block(cur, cur), *mid_attn, block(cur, cur))
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [block(cur + skips.pop(), m * ch)] + ([Attention(m * ch, cfg.num_heads)] if res in attn else [])
                cur = m * ch
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Resample(cur, up=True))
                    res *= 2
                self.up.append(Step(*layers))
        self.out = nn.Sequential(norm(cur), nn.SiLU(), zero(nn.Conv2d(cur, 3, 3, padding=1)))

    def forward(self, x, t):
        emb = self.time_embed(timestep_embedding(t, self.base))  # (B, 4*base)
        h, hs = self.inp(x), []
        hs.append(h)
        for step in self.down:
            h = step(h, emb)
            hs.append(h)
        h = self.mid(h, emb)
        for step in self.up:
            h = step(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


# ----------------------------------------------------------------------------- segmentation sub-network

def cbr(cin, cout):
    """3x3 convolution, BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SegmentationUNet(nn.Module):
    """DRAEM-style discriminative U-Net: cat(x0, x0_hat) (B,6,H,W) -> mask logits (B,1,H,W)."""
    def __init__(self, in_ch, base, depth=6):
        super().__init__()
        w = [base * min(2 ** i, 8) for i in range(depth)]  # 64, 128, 256, 512, 512, 512 at base 64
        self.enc = nn.ModuleList(nn.Sequential(cbr(in_ch if i == 0 else w[i - 1], w[i]), cbr(w[i], w[i]))
                                 for i in range(depth))
        self.up = nn.ModuleList(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                                              cbr(w[i + 1], w[i])) for i in reversed(range(depth - 1)))
        self.dec = nn.ModuleList(nn.Sequential(cbr(2 * w[i], w[i]), cbr(w[i], w[i])) for i in reversed(range(depth - 1)))
        self.out = nn.Conv2d(base, 1, 3, padding=1)

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()  # the bottleneck is x itself
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.out(x)


# ----------------------------------------------------------------------------- the model and its losses

def focal_loss(logits, target, focusing=2.0):
    """Binary focal loss from logits: mean of (1 - p_t)^2 * -log(p_t)."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # -log p_t
    return ((1.0 - torch.exp(-ce)) ** focusing * ce).mean()


class DiffusionAD(nn.Module):
    """Both sub-networks plus the schedule. `ablation` selects a Table 3 variant."""
    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.ablation = cfg, cfg.ablation
        self.pixel_range = (to_model(0.0, cfg), to_model(1.0, cfg))  # the image range the networks see
        self.denoiser = DenoisingUNet(cfg) if cfg.ablation != "seg-only" else None
        seg_in = 3 if cfg.ablation == "seg-only" else 6
        self.seg = SegmentationUNet(seg_in, cfg.seg_channels) if cfg.ablation != "denoise-only" else None
        sqrt_ab, sqrt_1mab = make_schedule(cfg)
        self.register_buffer("sqrt_ab", sqrt_ab, persistent=False)  # derived from cfg, not saved
        self.register_buffer("sqrt_1mab", sqrt_1mab, persistent=False)

    def q_sample(self, x0, t, eps):
        return extract(self.sqrt_ab, t) * x0 + extract(self.sqrt_1mab, t) * eps  # Eq. (2)

    def predict_x0(self, x_t, t, eps_hat):
        return (x_t - extract(self.sqrt_1mab, t) * eps_hat) / extract(self.sqrt_ab, t)  # Eq. (5)

    def restore(self, x0, t, eps):
        """One-step noise-to-norm: x0 (B,3,H,W) -> (x0_hat, eps_hat). The AE ablation ignores t and eps."""
        if self.ablation == "ae":
            return self.denoiser(x0, torch.zeros_like(t)), None
        x_t = self.q_sample(x0, t, eps)  # Alg. 1 / Alg. 2: corrupt
        eps_hat = self.denoiser(x_t, t)  # Alg. 1 / Alg. 2: predict the noise
        x0_hat = self.predict_x0(x_t, t, eps_hat)  # Eq. (5): one step back to x0
        return x0_hat.clamp(*self.pixel_range), eps_hat  # into the image range (authors' code)

    def segment(self, x0, x0_hat):
        """Mask logits (B,1,H,W) from cat(x0, x0_hat); the seg-only ablation sees x0 alone."""
        return self.seg(x0 if self.ablation == "seg-only" else torch.cat([x0, x0_hat], dim=1))

    def losses(self, x0, mask, n_normal, generator, joint=True):
        """Alg. 1 on one batch. x0 (B,3,H,W): n_normal normal images first, then synthetic; mask (B,1,H,W).
        joint=False: L_noise alone (ours: --denoiser-warmup)."""
        B, T = x0.shape[0], self.cfg.train_t or self.cfg.timesteps
        t = torch.randint(1, T + 1, (B,), generator=generator).to(x0.device)  # Alg. 1: t ~ U{1..T}
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)  # Alg. 1: eps ~ N(0, I)
        out, x0_hat = {}, None
        if self.denoiser is not None:
            x0_hat, eps_hat = self.restore(x0, t, eps)
            if self.ablation == "ae":  # DRAEM+: reconstruct the normal image under the anomaly
                out["rec"] = F.mse_loss(x0_hat, x0[:n_normal].repeat(B // n_normal, 1, 1, 1))
            else:
                out["noise"] = F.mse_loss(eps_hat[:n_normal], eps[:n_normal])  # Eq. (6), normal half
        if self.seg is not None and joint:
            if x0_hat is not None and self.cfg.seg_grad == "none":  # ours: no mask-loss gradient into the denoiser
                x0_hat = x0_hat.detach()
            logits = self.segment(x0, x0_hat)  # Alg. 1: M_hat = seg(cat(x0, x0_hat))
            out["mask"] = F.smooth_l1_loss(torch.sigmoid(logits), mask) \
                + self.cfg.gamma * focal_loss(logits, mask)  # Eq. (7)
        out["total"] = sum(out.values())  # Eq. (8)
        return out

    def forward(self, x0, mask, n_normal, generator, joint=True):
        """Calling the model is Alg. 1 (so that DistributedDataParallel can wrap it)."""
        return self.losses(x0, mask, n_normal, generator, joint)

    def anomaly_maps(self, x0, ts, noise):
        """Alg. 2 for a batch x0 (B,3,H,W) at all time steps ts at once.
        noise: (len(ts)*B,3,H,W). Returns maps (B,H,W), scores (B,), x0_hat (K*B,3,H,W) with row k*B+i
        image i restored at ts[k] (K = 1 for the ablations without diffusion)."""
        B, K = x0.shape[0], len(ts)
        if self.ablation in ("seg-only", "ae"):
            K, ts = 1, (0,)  # no diffusion: a single pass
        t = torch.tensor(ts, device=x0.device).repeat_interleave(B)  # (K*B,)
        x0k = x0.repeat(K, 1, 1, 1)  # (K*B,3,H,W), row k*B+i is image i at ts[k]
        if self.denoiser is None:
            x0_hat = x0k
        else:
            x0_hat, _ = self.restore(x0k, t, noise[: K * B])  # Alg. 2: corrupt, predict, Eq. (5)
        if self.seg is None:  # DenoisingAD: map = |x0 - x0_hat| averaged over channels
            maps = (x0k - x0_hat).abs().mean(1)
        else:
            maps = torch.sigmoid(self.segment(x0k, x0_hat))[:, 0]  # Alg. 2: M_hat, (K*B,H,W)
        maps = maps.float().view(K, B, *maps.shape[1:]).mean(0)  # Alg. 2: average over time steps
        return maps, self.image_score(maps), x0_hat

    def image_score(self, maps):
        """Alg. 2: an image's score is the mean of its top-K map values. maps (B,H,W) -> (B,)."""
        return maps.flatten(1).topk(min(self.cfg.top_k, maps[0].numel()), dim=1).values.mean(1)


# ----------------------------------------------------------------------------- runs, checkpoints, devices

def to_model(x, cfg):
    """data.py yields [0, 1]; the networks see cfg.pixel_range."""
    return x * 2.0 - 1.0 if cfg.pixel_range == "-1,1" else x


def from_model(x, cfg):
    return ((x + 1.0) / 2.0 if cfg.pixel_range == "-1,1" else x).clamp(0, 1)


def pick_device(cfg):
    """auto: CUDA when present (cuda:LOCAL_RANK under torchrun), else the CPU. --amp needs native bf16."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {cfg.device}: no CUDA device is available")
    if cfg.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(f"cuda:{local}" if cfg.device == "cuda" else cfg.device)
    if cfg.amp and device.type == "cpu" and not (torch.cpu._is_amx_tile_supported() or
                                                 torch.cpu._is_avx512_bf16_supported()):
        raise SystemExit("--amp: this CPU has no native bf16 (AMX or AVX512-BF16); bf16 would be emulated and "
                         "slower than float32. Drop --amp")
    if cfg.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit(f"--amp: {torch.cuda.get_device_name(device)} has no bf16 support. Drop --amp")
    return device


def memory_format(cfg, device, inference=False):
    """NHWC where it is faster: on CUDA, for bf16 on CPUs (oneDNN's AMX kernels), and for inference on CPUs
    (fp32: 1.50x instead of 1.38x the naive loop at the paper's size, AMD EPYC, README). CPU training in fp32
    stays NCHW, the layout every CPU result here was trained with (same numbers, bit for bit)."""
    return torch.channels_last if inference or device.type == "cuda" or cfg.amp else torch.contiguous_format


def autocast(cfg, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_run_dir(cfg):
    p = Path(cfg.data.rstrip("/"))
    name = p.name if p.name == "synthetic" or not p.parent.name else f"{p.parent.name}-{p.name}"
    return Path(cfg.out) if cfg.out else Path("runs") / (name + ("" if cfg.ablation == "none" else "-" + cfg.ablation))


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(path, model, opt, step, cfg, seconds=0.0):
    """Both networks, the optimizer, the step and the config. Loadable with torch.load(weights_only=True)."""
    state = {"denoiser": model.denoiser.state_dict() if model.denoiser is not None else {},
             "seg": model.seg.state_dict() if model.seg is not None else {},
             "optimizer": opt.state_dict(), "step": step, "seconds": seconds, "config": asdict(cfg)}
    atomic_save(state, path)


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"{path}: not a readable DiffusionAD checkpoint ({type(e).__name__}: {str(e)[:200]})")
    if not isinstance(ckpt, dict) or not {"denoiser", "seg", "config", "step"} <= ckpt.keys():
        raise SystemExit(f"{path}: not a DiffusionAD checkpoint (missing keys)")
    for name, neutral in RETIRED.items():  # options of earlier versions: fine when they were off
        if ckpt["config"].get(name, neutral) != neutral:
            raise SystemExit(f"{path}: trained with --{name.replace('_', '-')} {ckpt['config'][name]}, "
                             "which this version no longer has")
        ckpt["config"].pop(name, None)
    for name, value in LEGACY.items():
        ckpt["config"].setdefault(name, value)
    unknown = set(ckpt["config"]) - {f.name for f in fields(Config)}
    if unknown:
        raise SystemExit(f"{path}: checkpoint config has unknown fields {sorted(unknown)} (a newer version?)")
    return ckpt, Config(**ckpt["config"])


def check_same_run(saved, cfg, path):
    diff = [f"{f.name}: checkpoint {getattr(saved, f.name)!r} vs requested {getattr(cfg, f.name)!r}"
            for f in fields(Config) if f.name not in FREE_FIELDS and getattr(saved, f.name) != getattr(cfg, f.name)]
    if diff:
        raise SystemExit(f"{path} was trained with another configuration:\n  " + "\n  ".join(diff))


def build_model(cfg, ckpt=None, device="cpu"):
    """The model, with the checkpoint's weights if given."""
    model = DiffusionAD(cfg)
    if ckpt is not None:
        for name in ("denoiser", "seg"):
            net = getattr(model, name)
            if net is not None:
                try:
                    net.load_state_dict(ckpt[name])
                except RuntimeError as e:
                    raise SystemExit(f"checkpoint weights of the {name} do not fit its config: {str(e)[:500]}")
    return model.to(device)


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


def latest_run():
    ckpts = sorted(Path("runs").glob("**/ckpt.pt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise SystemExit("no run found under runs/: pass --run DIR or --ckpt FILE")
    return ckpts[-1]


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


def open_split(cfg, split, path=None):
    """data.open_dataset with a user's data problem turned into a one-line exit."""
    try:
        return data.open_dataset(path or cfg.data, split, cfg.img_size, foreground=cfg.foreground)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{e}")


def preflight(cfg):
    """Open both splits and check every file (data.check_dataset) before the first training step."""
    splits, problems = data.check_dataset(cfg.data, cfg.img_size, cfg.foreground)
    if len(problems) == 1 and not splits:
        raise SystemExit(problems[0])
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise SystemExit(f"{cfg.data}: {len(problems)} problem(s) found before training; fix them and start again:"
                         "\n  " + "\n  ".join(problems[:10]) + more)
    return splits


def make_trainset(cfg, normal=None):
    try:
        return data.TrainSet(normal or open_split(cfg, "train"), seed=cfg.seed, texture_dir=cfg.texture_dir or None,
                             foreground=cfg.foreground, shape=cfg.anomaly_shape, fill=cfg.anomaly_fill)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{e}")


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


# ----------------------------------------------------------------------------- Alg. 1: training

def lr_at(step, cfg, total):
    """Learning rate of 0-based `step` of `total`: constant (paper) or cosine decay to 0 at the last step (ours)."""
    return cfg.lr if cfg.lr_schedule == "constant" else cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))


def training_batch(batch, cfg, device):
    """A DataLoader batch of TrainSet items -> x0 (B,3,H,W) normal then synthetic, mask (B,1,H,W)."""
    x0 = to_model(torch.cat([batch["image"], batch["synthetic"]]), cfg).to(device, non_blocking=True)  # 3 + 3
    mask = torch.cat([torch.zeros_like(batch["synthetic_mask"]), batch["synthetic_mask"]]).to(device, non_blocking=True)
    return x0, mask


def recalibrate_bn(model, cfg, trainset, device, n_batches):
    """Re-estimate the seg net's BatchNorm statistics on inference-like inputs (ours): training batches,
    normal and synthetic, restored at the inference time steps (training sees t up to T)."""
    bns = [m for m in model.seg.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns or n_batches <= 0:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    ts, g = ints(cfg.eval_t), torch.Generator().manual_seed(cfg.seed + 7)
    epoch = 10 ** 6  # synthetic anomalies that training never saw
    batches = [[(epoch, i) for i in b] for b in data.epoch_batches(len(trainset), cfg.batch_size // 2, cfg.seed, epoch)]
    model.eval()
    model.seg.train()
    with torch.no_grad(), autocast(cfg, device):
        for batch in torch.utils.data.DataLoader(trainset, batch_sampler=batches[:n_batches]):
            x0, _ = training_batch(batch, cfg, device)
            if cfg.crop:
                x0, _ = data.random_crops(x0, torch.zeros_like(x0[:, :1]), cfg.crop, g)
            x0_hat = x0
            if model.denoiser is not None:
                t = torch.tensor(ts)[torch.randint(len(ts), (len(x0),), generator=g)].to(device)
                x0_hat, _ = model.restore(x0, t, torch.randn(x0.shape, generator=g).to(device))
            model.segment(x0, x0_hat)
    for m in bns:
        m.momentum = 0.1
    model.eval()
    print(f"re-estimated the seg net's BatchNorm statistics on {min(n_batches, len(batches))} training batches "
          f"at t = {cfg.eval_t}")


def ignore_sigint(_):
    """DataLoader workers leave Ctrl-C to the main process, which saves a checkpoint and stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train(cfg, resume=False):
    """Alg. 1 on one class; a final evaluation on its test split writes metrics.json. Under torchrun
    (WORLD_SIZE > 1) the model trains data-parallel and rank 0 alone writes to the run folder."""
    check_config(cfg)
    rank, world = distributed()
    device, run = pick_device(cfg), default_run_dir(cfg)
    ckpt_path, ckpt, lock = run / "ckpt.pt", None, None
    if resume:
        if not ckpt_path.is_file():
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path} (train without --resume to start)")
        ckpt, saved = load_checkpoint(ckpt_path)
        check_same_run(saved, cfg, ckpt_path)
    elif ckpt_path.exists():
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue it, or --out for a new run")
    splits = preflight(cfg)
    if rank == 0:
        try:
            run.mkdir(parents=True, exist_ok=True)
            lock = lock_run(run)
            (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        except OSError as e:
            raise SystemExit(f"{run}: cannot write the run folder ({e.strerror}); pass a writable --out")

    torch.manual_seed(cfg.seed)  # weights (and dropout)
    try:
        normal, held_out = data.holdout_split(splits["train"], cfg.holdout)
    except ValueError as e:
        raise SystemExit(f"{cfg.data}: {e}")
    trainset = make_trainset(cfg, normal)
    per_batch = cfg.batch_size // 2  # items per rank and step; each gives one normal and one synthetic image
    steps_per_epoch = len(trainset) // (per_batch * world)
    if steps_per_epoch == 0:
        raise SystemExit(f"{cfg.data}: {len(trainset)} training images, fewer than one batch of {per_batch * world}")
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch

    model = build_model(cfg, ckpt, device).to(memory_format=memory_format(cfg, device))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=device.type == "cuda")  # one optimizer, both nets
    step, seconds0 = 0, 0.0
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        step, seconds0 = ckpt["step"], ckpt.get("seconds", 0.0)
        print(f"resuming {run} at step {step}/{total}")
    if cfg.compile:
        compile_networks(model)
    fwd = model
    if world > 1:
        if model.seg is not None:
            sync_batch_norm(model.seg)
        fwd = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=cfg.denoiser_warmup > 0)
    workers = cfg.workers if cfg.workers >= 0 else (min(8, (os.cpu_count() or 2) - 1) if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(
        trainset, batch_sampler=data.run_batches(len(trainset), per_batch, cfg.seed, step, total, rank, world),
        num_workers=workers, pin_memory=device.type == "cuda", worker_init_fn=ignore_sigint,
        prefetch_factor=4 if workers else None)
    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"training {cfg.data} ({len(trainset)} normal images"
              + (f", {len(held_out)} held out for the threshold" if held_out is not None else "") + f") on {device}: {n_params / 1e6:.1f}M parameters, "
              f"{total} steps of {cfg.batch_size} images" + (f" per rank ({world} ranks: global batch "
              f"{cfg.batch_size * world})" if world > 1 else "") + f", {workers} loader workers, run folder {run}")

    log = writer = None
    if rank == 0:
        kept = [r for r in csv.reader(open(run / "log.csv"))][1:] if step else []  # rows up to the checkpoint
        log = open(run / "log.csv", "w", newline="")
        writer = csv.writer(log)
        writer.writerows([["step", "loss", "noise", "rec", "mask", "lr", "seconds"]] + [r for r in kept if int(r[0]) <= step])
    keys = [k for k in ("total", "noise", "rec", "mask") if k == "total" or
            (k == "noise" and model.denoiser is not None and cfg.ablation != "ae") or
            (k == "rec" and cfg.ablation == "ae") or (k == "mask" and model.seg is not None)]
    pending = []  # (step, losses as a device tensor, seconds): read back in bulk, no sync per step
    saved_step = step if ckpt is not None else None  # the step of the checkpoint on disk

    def flush():
        """Copy the pending losses to the host (one sync), stop on a non-finite one, append them to log.csv."""
        if not pending:
            return None
        values = torch.stack([v for _, v, _ in pending]).float().cpu()
        for (s, _, sec), v in zip(pending, values.tolist()):
            if not math.isfinite(v[0]):
                where = (f"the last good checkpoint (step {saved_step}) is kept at {ckpt_path}" if saved_step is not None
                         else "no checkpoint was written yet")
                raise SystemExit(f"loss is {v[0]} at step {s}; stopped, {where}. Try a lower --lr or no --amp")
            if writer is not None:
                row = dict(zip(keys, v))
                writer.writerow([s] + [f"{row[k]:.6f}" if math.isfinite(row.get(k, math.nan)) else ""
                                       for k in ("total", "noise", "rec", "mask")]
                                + [f"{lr_at(s - 1, cfg, total):.6g}", f"{sec:.2f}"])
        pending.clear()
        return dict(zip(keys, values[-1].tolist()))

    stop = {}  # set by SIGINT/SIGTERM: end after this step with a checkpoint
    def on_signal(signum, _):
        stop["signal"] = signum
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C kills at once; checkpoints are atomic
    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    t_start = t_print = time.time()
    step0, ended, last, keep = step, None, {}, set(ints(cfg.keep_ckpts))
    model.train()
    try:
        for batch in loader:
            x0, mask = training_batch(batch, cfg, device)
            x0 = x0.contiguous(memory_format=memory_format(cfg, device))
            g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * world + rank)  # Alg. 1 noise, resumable
            if cfg.crop:
                x0, mask = data.random_crops(x0, mask, cfg.crop, g)
            with autocast(cfg, device):
                loss = fwd(x0, mask, per_batch, g, step >= cfg.denoiser_warmup)  # Alg. 1
            opt.zero_grad(set_to_none=True)
            loss["total"].backward()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg, total)
            opt.step()
            step += 1
            now = time.time()
            nan = torch.full((), float("nan"), device=device)  # a loss this step does not have (--denoiser-warmup)
            pending.append((step, torch.stack([loss[k].detach() if k in loss else nan for k in keys]),
                            seconds0 + now - t_start))
            if cfg.max_minutes and seconds0 + now - t_start >= 60 * cfg.max_minutes:
                stop["time"] = True
            if world > 1 and (step % 10 == 0 or step == total):  # every rank stops at the same step, alike
                flags = torch.tensor([float("signal" in stop), float("time" in stop)], device=device)
                torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
                stop.update({k: stop.get(k, signal.SIGTERM) for k, f in zip(("signal", "time"), flags.tolist()) if f})
            halt = bool(stop) and (world == 1 or step % 10 == 0 or step == total)
            if step % cfg.ckpt_every == 0 or step == total or halt or step in keep:
                last = flush() or last  # never a checkpoint of non-finite weights
                if rank == 0:
                    log.flush()  # log.csv holds every row up to the checkpoint
                if rank == 0 and (step % cfg.ckpt_every == 0 or step == total or halt):
                    save_checkpoint(ckpt_path, model, opt, step, cfg, seconds0 + now - t_start)
                    saved_step = step
                if rank == 0 and step in keep:
                    save_checkpoint(run / f"ckpt_{step}.pt", model, opt, step, cfg, seconds0 + now - t_start)
            if now - t_print >= cfg.log_every or step == total or step == step0 + 1 or halt:
                last = flush() or last
                t_print, rate = now, (step - step0) / max(now - t_start, 1e-9)
                if rank == 0:
                    log.flush()
                    print(f"step {step}/{total} (epoch {(step - 1) // steps_per_epoch + 1}) | "
                          + " ".join(f"{k} {v:.4f}" for k, v in last.items() if math.isfinite(v))
                          + f" | {rate * cfg.batch_size * world:.1f} img/s | eta {fmt_time((total - step) / max(rate, 1e-9))}",
                          flush=True)
            if halt:
                ended = "signal" if "signal" in stop else "time"
                break
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(f"CUDA out of memory at step {step + 1}: try a smaller --batch-size, --amp, or a smaller "
                         f"--img-size / --base-channels. Last checkpoint: "
                         f"{f'step {saved_step}' if saved_step is not None else 'none yet'}")
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if log is not None:
            log.close()
    train_seconds = seconds0 + time.time() - t_start
    if ended == "signal":
        if rank == 0:
            again = " ".join(sys.argv) + ("" if "--resume" in sys.argv else " --resume")
            print(f"interrupted at step {step}/{total}: the checkpoint of step {step} is at {ckpt_path}. "
                  f"Resume with:\n  {again}", file=sys.stderr)
        raise SystemExit(128 + stop.get("signal", signal.SIGTERM))
    if rank != 0:
        return run
    print(f"trained {step - step0} steps in {fmt_time(train_seconds)}"
          + (f" (--max-minutes {cfg.max_minutes} reached at step {step}/{total})" if ended == "time" else "")
          + "; evaluating the final model on the test split")
    res = evaluate_model(model, cfg, cfg.data, ints(cfg.eval_t), device, test=splits["test"])
    res.update(train_seconds=round(train_seconds, 1), steps=step)
    write_metrics(run / "metrics.json", res, cfg)
    if cfg.compile:
        print("  " + compile_report() + " (training and evaluation)")
    lock.close()
    return run


def train_benchmark(cfg, classes):
    """Alg. 1 and the final evaluation for every class of a benchmark root, one run folder each under
    runs/<root name>/<class>/. Finished classes are skipped, an interrupted one resumes; a class that fails
    does not stop the others. Under torchrun, rank r takes classes r, r + N, ... on its own device."""
    rank, world = torchrun_env()
    root = Path(cfg.data.rstrip("/"))
    base = Path(cfg.out) if cfg.out else Path("runs") / (root.name + ("" if cfg.ablation == "none" else "-" + cfg.ablation))
    if cfg.classes:
        wanted = set(cfg.classes.split(","))
        unknown = wanted - {c.name for c in classes}
        if unknown:
            raise SystemExit(f"--classes: {', '.join(sorted(unknown))} not in {root} "
                             f"(it has {', '.join(c.name for c in classes)})")
        classes = [c for c in classes if c.name in wanted]
    base.mkdir(parents=True, exist_ok=True)
    listing = base / "benchmark.json"  # every class the table must show, finished or not
    known = json.loads(listing.read_text())["classes"] if listing.is_file() else []
    if rank == 0:
        listing.write_text(json.dumps({"root": str(root), "classes": sorted(set(known) | {c.name for c in classes})}))
    failed = []
    for cls in classes[rank::world]:
        run = base / cls.name
        if (run / "metrics.json").is_file():
            print(f"== {cls.name}: finished before, skipped ({run / 'metrics.json'})")
            continue
        resume = (run / "ckpt.pt").is_file()
        print(f"== {cls.name}: {'resuming' if resume else 'training'} in {run}", flush=True)
        try:
            train(replace(cfg, data=str(cls), out=str(run)), resume=resume)
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


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------- Alg. 2: inference and evaluation

def inference_noise(seed, n_steps, size, device="cpu"):
    """Alg. 2's noise: one draw eps_k ~ N(0, I) of shape (3, size, size) per time step, from the seed on the
    CPU generator, the same for every image on every device: an image's score does not depend on the batch
    it is in, and an exported program can hold the noise. (K, 3, size, size)."""
    return torch.randn((n_steps, 3, size, size), generator=torch.Generator().manual_seed(seed)).to(device)


def run_inference(model, images, cfg, ts, device, seed, keep_restorations=False, what="images"):
    """Alg. 2 over images (N,3,H,W) in [0, 1], in batches of cfg.eval_batch (the last one padded, so every
    batch has one shape), all time steps batched. Returns maps (N,H,W) and scores (N,) as numpy, the
    squared error of each restoration (N,K) per time step, and the restorations at ts[0] (N,3,H,W) if asked.
    Prints progress with an ETA every cfg.log_every seconds."""
    eps = inference_noise(seed, len(ts), images.shape[-1], device)  # (K,3,H,W): the same for every image
    fmt, B, N = memory_format(cfg, device, inference=True), cfg.eval_batch, len(images)
    model.eval().to(memory_format=fmt)
    maps_fn = model.anomaly_maps
    if cfg.compile:  # compiled once per model; CUDA graphs on a GPU (the batch shape never changes)
        if "compiled_maps" not in model.__dict__:
            model.__dict__["compiled_maps"] = torch.compile(
                model.anomaly_maps, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)
        maps_fn = model.__dict__["compiled_maps"]
    maps, scores, mse, restored = [], [], [], []
    t0 = t_print = time.time()
    with torch.inference_mode(), autocast(cfg, device):
        for i in range(0, N, B):
            x0 = to_model(images[i: i + B].to(device, non_blocking=True), cfg)
            n = len(x0)
            x0 = torch.cat([x0, x0[-1:].expand(B - n, -1, -1, -1)]).contiguous(memory_format=fmt)  # pad to B
            m, s, x0_hat = maps_fn(x0, ts, eps.repeat_interleave(B, dim=0))
            x0_hat = from_model(x0_hat.float(), cfg).view(-1, *x0.shape)[:, :n]  # (K,n,3,H,W) in [0, 1]
            maps.append(m[:n].float().cpu())
            scores.append(s[:n].float().cpu())
            mse.append((x0_hat - from_model(x0[:n].float(), cfg)).pow(2).mean((2, 3, 4)).t().cpu())  # (n,K)
            if keep_restorations:
                restored.append(x0_hat[0].cpu())
            now = time.time()
            if now - t_print >= cfg.log_every and i + n < N:
                t_print, rate = now, (i + n) / (now - t0)
                print(f"  {i + n}/{N} {what}, {rate:.1f}/s, eta {fmt_time((N - i - n) / rate)}", flush=True)
    return (torch.cat(maps).numpy(), torch.cat(scores).numpy(), torch.cat(mse).numpy(),
            torch.cat(restored) if keep_restorations else None)


def maps_without_restoration(model, images, cfg, device):
    """The segmentation net's maps (N,H,W) and scores (N,) with x0_hat := x0: what it finds in x0 alone. One
    segmentation pass, no restoration (the same map at every time step)."""
    fmt, out = memory_format(cfg, device, inference=True), []
    with torch.inference_mode(), autocast(cfg, device):
        for i in range(0, len(images), cfg.eval_batch):
            x0 = to_model(images[i: i + cfg.eval_batch].to(device), cfg).contiguous(memory_format=fmt)
            out.append(torch.sigmoid(model.segment(x0, x0))[:, 0].float().cpu())
    maps = torch.cat(out)
    return maps.numpy(), model.image_score(maps).numpy()


def evaluate_model(model, cfg, data_path, ts, device, maps_dir=None, test=None):
    """Alg. 2 on the whole test split: metrics (metrics.py), FPS, restoration PSNR; panels if maps_dir."""
    test = test or open_split(cfg, "test", data_path)
    problems = data.check_split(test)
    if problems:
        raise SystemExit(f"{data_path}: {len(problems)} unreadable test file(s):\n  " + "\n  ".join(problems[:10]))
    items = [test[i] for i in range(len(test))]  # read every file first: file reading is not timed
    images = torch.stack([it["image"] for it in items])  # (N,3,H,W)
    masks = np.stack([it["mask"][0].numpy() for it in items])  # (N,H,W)
    labels = np.array([it["label"] for it in items])
    kept = sum(it.get("regions_kept", 0) for it in items)
    if kept:
        print(f"  {kept} defect region(s) smaller than a pixel at {cfg.img_size} px kept as one pixel each")
    run_inference(model, images[: cfg.eval_batch], cfg, ts, device, cfg.seed)  # warm-up (and compilation)
    sync(device)
    t0 = time.perf_counter()
    maps, scores, mse, restored = run_inference(model, images, cfg, ts, device, cfg.seed, maps_dir is not None,
                                                "test images")
    sync(device)
    fps = len(images) / (time.perf_counter() - t0)
    res = metrics.evaluate(maps, masks, labels, scores, defects=[it["defect"] for it in items])
    if model.denoiser is not None and model.seg is not None:  # the seg net's reliance on the restoration
        plain_maps, plain_scores = maps_without_restoration(model, images, cfg, device)
        plain = metrics.evaluate(plain_maps, masks, labels, plain_scores)
        res["without_restoration"] = plain
        res["reliance"] = {k: res[k] - plain[k] for k in ("image_auroc", "pixel_auroc", "pixel_pro")}
    res.update(fps=round(fps, 3), n_test_good=int((labels == 0).sum()), n_test_anomalous=int((labels == 1).sum()),
               eval_t=list(ts), data=str(data_path), device=str(device), regions_kept=kept)
    if model.denoiser is not None and model.ablation != "ae" and (labels == 0).any():  # restoration of good images
        psnr = -10 * np.log10(np.maximum(mse[labels == 0], 1e-10)).mean(0)
        res["restoration_psnr_good"] = {str(t): round(float(p), 2) for t, p in zip(ts, psnr)}
    print(f"{data_path} (t = {','.join(map(str, ts))}, {len(images)} test images: {res['n_test_good']} good, "
          f"{res['n_test_anomalous']} anomalous)")
    cols = (("Image AUROC", "image_auroc"), ("Pixel AUROC", "pixel_auroc"), ("Pixel PRO", "pixel_pro"),
            ("Image AP", "image_ap"), ("Pixel AP", "pixel_ap"), ("Image F1", "image_f1_max"), ("Pixel F1", "pixel_f1_max"))
    print("  " + "  ".join(name for name, _ in cols) + "    FPS")
    print("  " + "  ".join(f"{100 * res[k]:>{len(name)}.1f}" for name, k in cols) + f"  {fps:>5.1f}")
    print(f"  FPS = test images/s through both networks at all time steps incl. the top-{cfg.top_k} score, "
          f"batch {cfg.eval_batch} on {device}, after a warm-up, file reading excluded. F1 = F1-max")
    if "reliance" in res:
        print("  reliance on the restoration (drop with x0_hat := x0): " + ", ".join(
            f"{name} {100 * res['reliance'][k]:+.1f}" for name, k in cols[:3]))
    if "restoration_psnr_good" in res:
        print("  restoration PSNR of the good test images (dB): "
              + ", ".join(f"t={t} {p:.1f}" for t, p in res["restoration_psnr_good"].items()))
    if maps_dir is not None:
        maps_dir.mkdir(parents=True, exist_ok=True)
        for it, img, rec, m in zip(items, images, restored, maps):
            panel = [data.to_uint8(img), data.to_uint8(rec), data.heatmap(m), data.to_uint8(it["mask"].expand(3, -1, -1))]
            data.save_png(maps_dir / f"{it['defect']}_{Path(it['path']).stem}.png", np.concatenate(panel, axis=1))
        print(f"  wrote {len(items)} panels (input | restoration at t={ts[0]} | map | ground truth) to {maps_dir}")
    return res


def write_metrics(path, res, cfg):
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in res.items()}
    clean["config"] = asdict(cfg)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(clean, indent=2))
    os.replace(tmp, path)
    print(f"  wrote {path}")


def open_run(a):
    """CLI arguments -> (model in eval mode, its config with the eval overrides, device, checkpoint path, state)."""
    path = Path(a.ckpt) if a.ckpt else (Path(a.run) / "ckpt.pt" if getattr(a, "run", None) else latest_run())
    state, cfg = load_checkpoint(path)
    cfg = check_config(replace(cfg, device=a.device, amp=a.amp, compile=a.compile, eval_t=a.t or cfg.eval_t,
                               eval_batch=a.batch or cfg.eval_batch, log_every=a.log_every or cfg.log_every))
    device = pick_device(cfg)
    model = build_model(cfg, state, device).eval()
    if getattr(a, "bn_recal", 0):
        recalibrate_bn(model, cfg, make_trainset(cfg), device, a.bn_recal)
    return model, cfg, device, path, state


def eval_name(a, cfg, path):
    """The file name of an evaluation: what was evaluated, on what, how. Never a training run's metrics.json."""
    data_name = Path((a.data or cfg.data).rstrip("/")).name
    parts = ["eval", path.stem, data_name, "t" + cfg.eval_t.replace(",", "+")]
    parts += [p for p, on in (("amp", a.amp), (f"bnrecal{a.bn_recal}", a.bn_recal)) if on]
    return "_".join(parts)


def evaluate_cmd(a):
    model, cfg, device, path, state = open_run(a)
    name = eval_name(a, cfg, path)
    out = Path(a.json) if a.json else path.parent / f"{name}.json"
    if out.name == "metrics.json" or (a.json and out.exists()):
        raise SystemExit(f"--json {out}: {'a run’s own result' if out.name == 'metrics.json' else 'exists'}; "
                         "pass a new file name")
    print(f"evaluating {path} (step {state['step']})")
    res = evaluate_model(model, cfg, a.data or cfg.data, ints(cfg.eval_t), device,
                         path.parent / name if a.save_maps else None)
    res.update(train_seconds=round(state.get("seconds", 0.0), 1), steps=state["step"], checkpoint=str(path))
    write_metrics(out, res, cfg)


def predict_cmd(a):
    try:
        files = data.list_images(a.inputs)
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    model, cfg, device, path, _ = open_run(a)
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
    stream = open(a.csv, "w", newline="") if a.csv else sys.stdout
    writer = csv.writer(stream)
    writer.writerow(["path", "score", "heatmap"])
    bad, used, done, t0 = [], set(), 0, time.time()
    for i in range(0, len(files), 64):  # a chunk of files at a time: any folder size fits in memory
        chunk, images = [], []
        for f in files[i: i + 64]:
            try:
                images.append(data.load_image(f, cfg.img_size))
                chunk.append(f)
            except (FileNotFoundError, ValueError) as e:
                bad.append(str(e))
        if not chunk:
            continue
        maps, scores, _, _ = run_inference(model, torch.stack(images), cfg, ints(cfg.eval_t), device, cfg.seed)
        for f, img, m, s in zip(chunk, images, maps, scores):
            png = out / (f"{f.stem}_map.png" if f.stem not in used else f"{f.parent.name}_{f.stem}_{len(used)}_map.png")
            used.add(f.stem)
            data.save_png(png, np.concatenate([data.to_uint8(img), data.heatmap(m)], axis=1))
            writer.writerow([str(f), f"{s:.6f}", str(png)])
        done += len(chunk)
        if len(files) > 64:
            rate = done / (time.time() - t0)
            print(f"  {done}/{len(files)} images, {rate:.1f}/s, eta {fmt_time((len(files) - i - 64) / rate)}",
                  file=sys.stderr if not a.csv else sys.stdout, flush=True)
    if a.csv:
        stream.close()
        print(f"wrote scores of {done} images to {a.csv} and heatmaps to {out}")
    if bad:
        raise SystemExit(f"{len(bad)} of {len(files)} files could not be read and were skipped:\n  " + "\n  ".join(bad))


def write_table(folder):
    """table.md and table.csv of a benchmark folder (metrics.table); returns the markdown."""
    md, text = metrics.table(folder)
    for name, content in (("table.md", md), ("table.csv", text)):
        (Path(folder) / (name + ".tmp")).write_text(content)
        os.replace(Path(folder) / (name + ".tmp"), Path(folder) / name)
    return md + f"\nwrote {Path(folder) / 'table.md'} and table.csv"


# ----------------------------------------------------------------------------- benchmark

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


def bench(cfg, n_images, train_size, train_steps):
    """Side by side in one process: the plain path (fp32, NCHW, per-step host sync, for-each Adam; the
    authors' one-image evaluation loop) and the shipped one with this command's --amp / --compile (NHWC and
    fused Adam on CUDA, no per-step sync, padded fixed-shape inference batches), with peak memory; and the
    synthesizer's DataLoader alone."""
    device = pick_device(cfg)
    mem = "peak GPU memory" if device.type == "cuda" else "process peak RSS so far"
    tcfg = check_config(replace(cfg, img_size=train_size))
    B = tcfg.batch_size
    x0 = torch.rand(B, 3, train_size, train_size, device=device)
    mask = (torch.rand(B, 1, train_size, train_size, device=device) > 0.9).float()
    print(f"training step, {train_size}x{train_size}, batch {B}, base {cfg.base_channels}, {device}:")
    for shipped in (False, True):
        c = tcfg if shipped else replace(tcfg, amp=False, compile=False)
        torch.manual_seed(cfg.seed)
        fmt = memory_format(c, device) if shipped else torch.contiguous_format
        model = build_model(c, device=device).train().to(memory_format=fmt)
        opt = torch.optim.Adam(model.parameters(), lr=c.lr, fused=shipped and device.type == "cuda")
        if shipped and c.compile:
            compile_networks(model)
        x = x0.contiguous(memory_format=fmt)

        def step():
            with autocast(c, device):
                loss = model(x, mask, B // 2, torch.Generator().manual_seed(0))["total"]
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
            f"shipped ({'bf16' if c.amp else 'fp32'}, {'NHWC' if fmt == torch.channels_last else 'NCHW'}" \
            f"{', compiled' if c.compile else ''}{', fused Adam' if device.type == 'cuda' else ''}, no per-step sync)"
        print(f"  {name}: {B / step_s:.2f} samples/s, {n:.1f}M params, {mem} {peak_memory_mb(device):.0f} MiB")
        model = opt = None  # free before the next model is built
    if cfg.workers:
        trainset = make_trainset(replace(tcfg, data=cfg.data))
        workers = cfg.workers if cfg.workers > 0 else min(8, (os.cpu_count() or 2) - 1)
        batches = data.run_batches(len(trainset), B // 2, 0, 0, 40 + 2 * workers)
        loader = iter(torch.utils.data.DataLoader(trainset, batch_sampler=batches, num_workers=workers,
                                                  pin_memory=device.type == "cuda", prefetch_factor=4))
        for _ in range(2 * workers):  # workers started, queues filled
            next(loader)
        t0 = time.perf_counter()
        for _ in range(40):
            next(loader)
        rate = 40 * B / (time.perf_counter() - t0)
        print(f"  data loader alone ({cfg.data}, {workers} workers, synthesizer included): {rate:.1f} images/s")

    model, ts = build_model(check_config(replace(cfg, amp=False, compile=False)), device=device).eval(), ints(cfg.eval_t)
    images = torch.rand(n_images, 3, cfg.img_size, cfg.img_size)
    noise = torch.randn(n_images, len(ts), 3, cfg.img_size, cfg.img_size, device=device)

    def naive():  # the authors' evaluation: one image and one time step at a time, autograd on, fp32
        for i in range(n_images):
            x = to_model(images[i: i + 1].to(device), cfg)
            m = torch.stack([model.anomaly_maps(x, (t,), noise[i, k: k + 1])[0] for k, t in enumerate(ts)]).mean(0)
            m.flatten(1).topk(cfg.top_k, dim=1).values.mean(1).item()
    print(f"inference, {cfg.img_size}x{cfg.img_size}, base {cfg.base_channels}, t = {cfg.eval_t}, {n_images} images, "
          f"{device}:")
    base_fps = None
    paths = [("naive (1 image, time steps in turn, autograd on, fp32)", None),
             (f"shipped (batch {cfg.eval_batch}, time steps batched, inference_mode, fp32)", replace(cfg, amp=False, compile=False))]
    if cfg.amp or cfg.compile:
        paths.append((f"shipped with{' bf16' if cfg.amp else ''}{' compile' if cfg.compile else ''}"
                      f"{' + CUDA graphs' if cfg.compile and device.type == 'cuda' else ''}", cfg))
    for name, c in paths:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        fn = naive if c is None else (lambda c=c: run_inference(model, images, replace(c, log_every=1e9), ts, device, 0))
        fps = n_images / timed(fn, device)
        base_fps = base_fps or fps
        print(f"  {name}: {fps:.2f} images/s ({fps / base_fps:.2f}x), {mem} {peak_memory_mb(device):.0f} MiB")
    if cfg.compile:
        print("  " + compile_report())


# ----------------------------------------------------------------------------- command line

def add_config_flags(p):
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=f.metadata["help"])
        else:
            p.add_argument(flag, type=f.type, default=argparse.SUPPRESS, metavar=f.type.__name__.upper(),
                           help=f"{f.metadata['help']} (default: {f.default})")
    p.add_argument("--preset", choices=["paper", "cpu"], default="paper",
                   help="'cpu': a small model for 2 CPU cores (README quickstart); explicit flags still win")


def config_from(a):
    given = {f.name: getattr(a, f.name) for f in fields(Config) if hasattr(a, f.name)}
    preset = dict(CPU_PRESET) if a.preset == "cpu" else {}
    if preset and given.get("img_size", 64) != 64:  # the same 16-px bottom level at any size: attention stays cheap
        preset["channel_mult"] = {128: "1,2,2,4", 256: "1,2,2,4,4", 512: "1,2,2,4,4,4"}.get(given["img_size"], "")
        preset["eval_batch"] = 4  # at 256 px a batch of 16 ran at half the speed of 4, with 1.6x the memory (README)
    return Config(**{**preset, **given})


def add_inference_flags(p):
    p.add_argument("--t", help="time steps, e.g. 100,200 (default: the run's --eval-t)")
    p.add_argument("--batch", type=int, help="images per inference batch")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPUs; CPUs with native bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile Alg. 2 (CUDA graphs on a GPU)")
    p.add_argument("--log-every", type=float, help="seconds between progress lines")


def main(argv=None):
    p = argparse.ArgumentParser(prog="diffusionad.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="Alg. 1: train on the normal images of --data, then evaluate", allow_abbrev=False)
    add_config_flags(t)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    e = sub.add_parser("eval", help="Alg. 2 on the test split: metrics, FPS, optional map panels", allow_abbrev=False)
    e.add_argument("--run", help="run folder (default: the most recent under runs/)")
    e.add_argument("--ckpt", help="checkpoint file (instead of --run)")
    e.add_argument("--data", help="test data (default: the training data)")
    e.add_argument("--save-maps", action="store_true", help="PNG panels: input | restoration | map | truth")
    e.add_argument("--json", help="where to write the metrics (default: <run>/eval_<checkpoint>_<data>_t<t>.json)")
    e.add_argument("--bn-recal", type=int, default=0, help="first re-estimate the seg net's BatchNorm statistics "
                   "on this many training batches at the inference time steps (ours)")
    add_inference_flags(e)
    r = sub.add_parser("predict", help="score your own images, write heatmaps", allow_abbrev=False)
    r.add_argument("inputs", nargs="+", help="image files or folders")
    r.add_argument("--ckpt", help="checkpoint file (default: the most recent run)")
    r.add_argument("--out", help="new folder for heatmap PNGs (default: <run>/predictions-<date-time>)")
    r.add_argument("--csv", help="write the scores to this new file instead of stdout")
    add_inference_flags(r)
    b = sub.add_parser("bench", help="training and inference speed, plain and shipped paths side by side",
                       allow_abbrev=False)
    add_config_flags(b)
    b.add_argument("--n-images", type=int, default=8, help="test images for the inference timing")
    b.add_argument("--train-size", type=int, default=128, help="image size for the training-step timing")
    b.add_argument("--train-steps", type=int, default=3, help="timed training steps per path")
    s = sub.add_parser("table", help="the benchmark table of runs/<root name>: ours and the paper's", allow_abbrev=False)
    s.add_argument("folder", help="a benchmark's run folder, e.g. runs/VisA_20220922")
    a = p.parse_args(argv)
    _, world = torchrun_env()
    if world > 1 and a.cmd != "train":
        raise SystemExit(f"{a.cmd} runs in one process: start it without torchrun")
    if a.cmd == "train":
        cfg = check_config(config_from(a))
        classes = [] if cfg.data.startswith("synthetic") else data.find_classes(cfg.data)
        if classes:
            train_benchmark(cfg, classes)  # finished classes are skipped, an interrupted one resumes
        elif world > 1:  # torchrun on one class: data-parallel
            cuda = torch.cuda.is_available() and cfg.device != "cpu"
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            torch.distributed.init_process_group("nccl" if cuda else "gloo")
            try:
                train(cfg, resume=a.resume)
            finally:
                torch.distributed.destroy_process_group()
        else:
            train(cfg, resume=a.resume)
    elif a.cmd == "eval":
        evaluate_cmd(a)
    elif a.cmd == "predict":
        predict_cmd(a)
    elif a.cmd == "table":
        if not Path(a.folder).is_dir():
            raise SystemExit(f"{a.folder}: no such folder (a benchmark's runs, e.g. runs/VisA_20220922)")
        print(write_table(a.folder))
    else:
        bench(check_config(config_from(a)), a.n_images, a.train_size, a.train_steps)


if __name__ == "__main__":
    main()
