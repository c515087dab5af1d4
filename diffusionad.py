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
- Options of ours, off by default: --crop trains on crops that keep the anomaly (whole images at eval);
  --train-t N draws Alg. 1's t from 1..N (the authors' later code uses < 300; no gain in our runs).
"""
import argparse
import copy
import csv
import json
import math
import os
import resource
import sys
import time
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
    data: str = arg("synthetic", "dataset ROOT/CLASS (MVTec AD, VisA raw or 1cls, DAGM 2007) or 'synthetic'")
    out: str = arg("", "run folder (default runs/<dataset>-<class>)")
    img_size: int = arg(256, "image side, Sec. 4.2")
    crop: int = arg(0, "if > 0, train on crops of this side that keep part of the anomaly; eval whole images (ours)")
    pixel_range: str = arg("0,1", "range fed to the networks, '0,1' or '-1,1' (authors' code: 0,1)")
    foreground: str = arg("auto", "synthesis foreground: auto|object|texture|none (data.py, Sec. 3.3)")
    texture_dir: str = arg("", "anomaly source textures such as DTD; empty = self-augmentation (Sec. 3.3)")
    timesteps: int = arg(1000, "T, Sec. 4.2")
    train_t: int = arg(0, "Alg. 1 draws t ~ U{1..train_t}; 0 = T (paper; the authors' later code: < 300)")
    beta_start: float = arg(1e-4, "linear schedule start, DDPM / authors' code (paper text: 1e-2)")
    beta_end: float = arg(0.02, "linear schedule end, Sec. 4.2")
    base_channels: int = arg(128, "denoiser width, Sec. 4.2")
    channel_mult: str = arg("", "denoiser level multipliers; empty = by size, 1,1,2,2,4,4 at 256 (authors' code)")
    num_res_blocks: int = arg(2, "residual blocks per level (authors' code)")
    attn_resolutions: str = arg("32,16,8", "self-attention resolutions, Sec. 4.2")
    num_heads: int = arg(4, "attention heads, Sec. 4.2")
    dropout: float = arg(0.0, "denoiser dropout (authors' code)")
    seg_channels: int = arg(64, "segmentation net base width (DRAEM's discriminative net)")
    gamma: float = arg(5.0, "focal-loss weight in L_mask, Eq. 7 / Sec. 4.2")
    batch_size: int = arg(6, "images per step, half normal half synthetic: 3 + 3, Sec. 4.2")
    lr: float = arg(1e-4, "Adam learning rate, one optimizer over both networks, Sec. 4.2")
    lr_schedule: str = arg("constant", "constant (paper) | cosine: linear warm-up, then cosine decay to 0 at the last step (ours)")
    warmup: int = arg(0, "warm-up steps of the cosine schedule (ours)")
    ema: float = arg(0.0, "if > 0, evaluate an exponential moving average of the denoiser's weights with this decay (ours; the paper uses none)")
    seg_grad: str = arg("full", "the mask loss's gradient into the denoiser through Eq. 5: full (paper) | none | scaled (times sqrt(alpha_bar_t)) (ours)")
    seg_norm: str = arg("batch", "segmentation net normalization: batch (DRAEM) | group (no running statistics; ours)")
    bn_recal: int = arg(0, "if > 0, after training re-estimate the seg net's BatchNorm statistics on this many training batches restored at --eval-t (ours)")
    epochs: int = arg(500, "training epochs, Sec. 4.2")
    max_steps: int = arg(0, "if > 0, train this many steps instead of `epochs` (ours, for CPU budgets)")
    eval_t: str = arg("100,200", "inference time steps whose maps are averaged, Sec. 4.2 / Table 4")
    top_k: int = arg(50, "image score = mean of the top-K map values, Sec. 3.4")
    eval_batch: int = arg(8, "test images per inference batch (ours)")
    ablation: str = arg("none", "Table 3: none | seg-only | ae (DRAEM+) | denoise-only")
    seed: int = arg(0, "seed for weights, batches, training noise and evaluation noise")
    device: str = arg("auto", "auto (CUDA when present) | cpu | cuda")
    amp: bool = arg(False, "bf16 autocast (GPU; also CPUs with AMX)")
    compile: bool = arg(False, "torch.compile the networks")
    workers: int = arg(2, "DataLoader worker processes")
    ckpt_every: int = arg(500, "steps between checkpoints (always one at the end)")
    keep_ckpts: str = arg("", "steps whose checkpoint is also kept as ckpt_<step>.pt, e.g. 600,1200 (curves; ours)")
    log_every: float = arg(10.0, "seconds between progress lines")


# Small model for a 2-core CPU (README quickstart); flags given on the command line win.
CPU_PRESET = dict(img_size=64, base_channels=16, num_res_blocks=1, channel_mult="1,2,4", attn_resolutions="16",
                  seg_channels=16, max_steps=900, lr=5e-4, eval_batch=16, workers=0)
# Fields that may change when a run is resumed; all others define the networks or the training problem.
FREE_FIELDS = ("out", "epochs", "max_steps", "eval_t", "top_k", "eval_batch", "device", "amp", "compile",
               "workers", "ckpt_every", "keep_ckpts", "log_every", "bn_recal")
ABLATIONS = ("none", "seg-only", "ae", "denoise-only")
CHOICES = {"ablation": ABLATIONS, "pixel_range": ("0,1", "-1,1"), "lr_schedule": ("constant", "cosine"),
           "seg_grad": ("full", "none", "scaled"), "seg_norm": ("batch", "group")}


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
    mult = channel_mult(cfg)
    problems = []
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            problems.append(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")
    if not 0 <= cfg.ema < 1:
        problems.append(f"--ema must be in [0, 1) (0 = off), got {cfg.ema}")
    if cfg.batch_size < 2 or cfg.batch_size % 2:
        problems.append(f"--batch-size must be even (half normal, half synthetic), got {cfg.batch_size}")
    if cfg.img_size % 32 or cfg.img_size % 2 ** (len(mult) - 1):
        problems.append(f"--img-size {cfg.img_size} must be divisible by 32 and by 2^(levels-1) of --channel-mult")
    if cfg.base_channels % cfg.num_heads:
        problems.append(f"--base-channels {cfg.base_channels} must be divisible by --num-heads {cfg.num_heads}")
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
        self.mid = Step(block(cur, cur), Attention(cur, cfg.num_heads), block(cur, cur))
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

def conv_bn_relu(cin, cout, group_norm=False):
    bn = nn.GroupNorm(math.gcd(8, cout), cout) if group_norm else nn.BatchNorm2d(cout)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), bn, nn.ReLU(inplace=True))


class SegmentationUNet(nn.Module):
    """DRAEM-style discriminative U-Net: cat(x0, x0_hat) (B,6,H,W) -> mask logits (B,1,H,W)."""
    def __init__(self, in_ch, base, depth=6, group_norm=False):
        super().__init__()
        w = [base * min(2 ** i, 8) for i in range(depth)]  # 64, 128, 256, 512, 512, 512 at base 64
        cbr = lambda cin, cout: conv_bn_relu(cin, cout, group_norm)
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
        self.seg = (SegmentationUNet(seg_in, cfg.seg_channels, group_norm=cfg.seg_norm == "group")
                    if cfg.ablation != "denoise-only" else None)
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

    def losses(self, x0, mask, n_normal, generator):
        """Alg. 1 on one batch. x0 (B,3,H,W): n_normal normal images first, then synthetic; mask (B,1,H,W)."""
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
        if self.seg is not None:
            if x0_hat is not None and self.cfg.seg_grad == "none":  # ours: no mask-loss gradient into the denoiser
                x0_hat = x0_hat.detach()
            elif x0_hat is not None and self.cfg.seg_grad == "scaled":  # ours: undo Eq. 5's 1/sqrt(alpha_bar_t)
                k = extract(self.sqrt_ab, t)  # same values, gradient times k
                x0_hat = x0_hat.detach() + k * (x0_hat - x0_hat.detach())
            logits = self.segment(x0, x0_hat)  # Alg. 1: M_hat = seg(cat(x0, x0_hat))
            out["mask"] = F.smooth_l1_loss(torch.sigmoid(logits), mask) \
                + self.cfg.gamma * focal_loss(logits, mask)  # Eq. (7)
        out["total"] = sum(out.values())  # Eq. (8)
        return out

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
        k = min(self.cfg.top_k, maps[0].numel())
        scores = maps.flatten(1).topk(k, dim=1).values.mean(1)  # Alg. 2: mean of the top-K pixels
        return maps, scores, x0_hat


# ----------------------------------------------------------------------------- runs, checkpoints, devices

def to_model(x, cfg):
    """data.py yields [0, 1]; the networks see cfg.pixel_range."""
    return x * 2.0 - 1.0 if cfg.pixel_range == "-1,1" else x


def from_model(x, cfg):
    return ((x + 1.0) / 2.0 if cfg.pixel_range == "-1,1" else x).clamp(0, 1)


def pick_device(cfg):
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(cfg.device)


def autocast(cfg, device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp)


def default_run_dir(cfg):
    p = Path(cfg.data.rstrip("/"))
    name = p.name if p.name == "synthetic" or not p.parent.name else f"{p.parent.name}-{p.name}"
    return Path(cfg.out) if cfg.out else Path("runs") / (name + ("" if cfg.ablation == "none" else "-" + cfg.ablation))


def save_checkpoint(path, model, opt, step, cfg, seconds=0.0, ema=None):
    """Atomic: write a temporary file, then rename. Loadable with torch.load(weights_only=True)."""
    state = {"denoiser": model.denoiser.state_dict() if model.denoiser is not None else {},
             "seg": model.seg.state_dict() if model.seg is not None else {},
             "optimizer": opt.state_dict(), "step": step, "seconds": seconds, "config": asdict(cfg)}
    if ema is not None:
        state["denoiser_ema"] = ema.state_dict()
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"{path}: not a readable DiffusionAD checkpoint ({type(e).__name__}: {e})")
    known = {f.name for f in fields(Config)}
    if not isinstance(ckpt, dict) or not {"denoiser", "seg", "config", "step"} <= ckpt.keys():
        raise SystemExit(f"{path}: not a DiffusionAD checkpoint (missing keys)")
    unknown = set(ckpt["config"]) - known
    if unknown:
        raise SystemExit(f"{path}: checkpoint config has unknown fields {sorted(unknown)}")
    return ckpt, Config(**ckpt["config"])


def check_same_run(saved, cfg, path):
    diff = [f"{f.name}: checkpoint {getattr(saved, f.name)!r} vs requested {getattr(cfg, f.name)!r}"
            for f in fields(Config) if f.name not in FREE_FIELDS and getattr(saved, f.name) != getattr(cfg, f.name)]
    if diff:
        raise SystemExit(f"{path} was trained with another configuration:\n  " + "\n  ".join(diff))


def build_model(cfg, ckpt=None, device="cpu", use_ema=False):
    """The model, with the checkpoint's weights if given (use_ema: the denoiser's EMA weights, if saved)."""
    model = DiffusionAD(cfg)
    if ckpt is not None:
        for name in ("denoiser", "seg"):
            net = getattr(model, name)
            if net is not None:
                try:
                    net.load_state_dict(ckpt["denoiser_ema" if name == "denoiser" and use_ema and
                                             "denoiser_ema" in ckpt else name])
                except RuntimeError as e:
                    raise SystemExit(f"checkpoint weights of the {name} do not fit its config: {str(e)[:500]}")
    return model.to(device)


def latest_run():
    ckpts = sorted(Path("runs").glob("*/ckpt.pt"), key=lambda p: p.stat().st_mtime)
    if not ckpts:
        raise SystemExit("no run found under runs/: pass --run DIR or --ckpt FILE")
    return ckpts[-1]


# ----------------------------------------------------------------------------- Alg. 1: training

def epoch_batches(n_items, per_batch, seed, epoch):
    """The epoch's batches of item indices: a permutation seeded by (seed, epoch), so resumable."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    steps = n_items // per_batch
    return torch.randperm(n_items, generator=g)[: steps * per_batch].view(steps, per_batch).tolist()


def lr_at(step, cfg, total):
    """The learning rate of 0-based `step`: constant (paper), or linear warm-up then cosine decay to 0 (ours)."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(total - cfg.warmup, 1)))


def make_trainset(cfg):
    normal = data.open_dataset(cfg.data, "train", cfg.img_size, foreground=cfg.foreground)
    return data.TrainSet(normal, seed=cfg.seed, texture_dir=cfg.texture_dir or None, foreground=cfg.foreground)


def training_batch(batch, cfg, device):
    """A DataLoader batch of TrainSet items -> x0 (B,3,H,W) normal then synthetic, mask (B,1,H,W)."""
    x0 = to_model(torch.cat([batch["image"], batch["synthetic"]]), cfg).to(device)  # 3 + 3
    mask = torch.cat([torch.zeros_like(batch["synthetic_mask"]), batch["synthetic_mask"]]).to(device)
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
    trainset.set_epoch(10 ** 6)  # synthetic anomalies the training never saw
    batches = epoch_batches(len(trainset), cfg.batch_size // 2, cfg.seed, 10 ** 6)[:n_batches]
    model.eval()
    model.seg.train()
    with torch.no_grad(), autocast(cfg, device):
        for batch in torch.utils.data.DataLoader(trainset, batch_sampler=batches, num_workers=cfg.workers):
            x0, _ = training_batch(batch, cfg, device)
            if cfg.crop:
                x0, _ = random_crops(x0, torch.zeros_like(x0[:, :1]), cfg.crop, g)
            x0_hat = x0
            if model.denoiser is not None:
                t = torch.tensor(ts)[torch.randint(len(ts), (len(x0),), generator=g)].to(device)
                x0_hat, _ = model.restore(x0, t, torch.randn(x0.shape, generator=g).to(device))
            model.segment(x0, x0_hat)
    for m in bns:
        m.momentum = 0.1
    model.eval()
    print(f"re-estimated the seg net's BatchNorm statistics on {len(batches)} training batches at t = {cfg.eval_t}")


def random_crops(x0, mask, side, generator):
    """One side x side window per image: uniform for normal images; for synthetic ones placed so that it
    contains a random anomalous pixel, so that a crop rarely misses the anomaly it was made for."""
    H, W = x0.shape[-2:]
    xs, ms = [], []
    for img, m in zip(x0, mask):
        r = torch.rand(3, generator=generator).tolist()
        where = m[0].nonzero()
        if len(where):
            y, x = where[int(r[0] * len(where))].tolist()
            top, left = y - int(r[1] * side), x - int(r[2] * side)
        else:
            top, left = int(r[1] * (H - side + 1)), int(r[2] * (W - side + 1))
        top, left = min(max(top, 0), H - side), min(max(left, 0), W - side)
        xs.append(img[:, top:top + side, left:left + side])
        ms.append(m[:, top:top + side, left:left + side])
    return torch.stack(xs), torch.stack(ms)


def train(cfg, resume=False):
    check_config(cfg)
    device, run = pick_device(cfg), default_run_dir(cfg)
    ckpt_path = run / "ckpt.pt"
    ckpt = None
    if resume:
        if not ckpt_path.is_file():
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path} (train without --resume to start)")
        ckpt, saved = load_checkpoint(ckpt_path)
        check_same_run(saved, cfg, ckpt_path)
    elif ckpt_path.exists():
        raise SystemExit(f"{ckpt_path} exists: pass --resume to continue it, or --out for a new run")
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2))

    torch.manual_seed(cfg.seed)  # weights (and dropout)
    trainset = make_trainset(cfg)
    per_batch = cfg.batch_size // 2  # items; each gives one normal and one synthetic image
    steps_per_epoch = len(trainset) // per_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"{cfg.data}: {len(trainset)} training images, fewer than one batch of {per_batch}")
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch

    model = build_model(cfg, ckpt, device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)  # one optimizer over both sub-networks
    ema = None
    if cfg.ema and model.denoiser is not None:  # ours: EMA of the denoiser's weights, used for evaluation
        ema = copy.deepcopy(model.denoiser).requires_grad_(False)
        if ckpt is not None:
            ema.load_state_dict(ckpt["denoiser_ema"])
    step, seconds0 = 0, 0.0
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        step, seconds0 = ckpt["step"], ckpt.get("seconds", 0.0)
        print(f"resuming {run} at step {step}/{total}")
    fwd = torch.compile(model.losses) if cfg.compile else model.losses
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training {cfg.data} ({len(trainset)} normal images) on {device}: {n_params / 1e6:.1f}M parameters, "
          f"{total} steps of {cfg.batch_size} images, run folder {run}")

    kept = [r for r in csv.reader(open(run / "log.csv"))][1:] if step else []  # rows up to the checkpoint
    log = open(run / "log.csv", "w", newline="")
    writer = csv.writer(log)
    writer.writerows([["step", "loss", "noise", "rec", "mask", "lr", "seconds"]] + [r for r in kept if int(r[0]) <= step])
    t_start = t_print = time.time()
    step0, saved_step = step, step
    model.train()
    try:
        while step < total:
            epoch, start = divmod(step, steps_per_epoch)
            trainset.set_epoch(epoch)
            batches = epoch_batches(len(trainset), per_batch, cfg.seed, epoch)[start:]
            loader = torch.utils.data.DataLoader(trainset, batch_sampler=batches, num_workers=cfg.workers)
            for batch in loader:
                x0, mask = training_batch(batch, cfg, device)
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # Alg. 1 noise, resumable
                if cfg.crop:
                    x0, mask = random_crops(x0, mask, cfg.crop, g)
                with autocast(cfg, device):
                    loss = fwd(x0, mask, per_batch, g)
                if not torch.isfinite(loss["total"]):
                    raise SystemExit(f"loss is {loss['total'].item()} at step {step + 1}; stopped. The last good "
                                     f"checkpoint (step {saved_step}) is kept at {ckpt_path}")
                opt.zero_grad(set_to_none=True)
                loss["total"].backward()
                lr = lr_at(step, cfg, total)
                for group in opt.param_groups:
                    group["lr"] = lr
                opt.step()
                if ema is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(list(ema.parameters()), list(model.denoiser.parameters()), 1 - cfg.ema)
                step += 1
                now = time.time()
                writer.writerow([step] + [f"{loss[k].item():.6f}" if k in loss else "" for k in
                                          ("total", "noise", "rec", "mask")] + [lr, f"{seconds0 + now - t_start:.2f}"])
                if step % cfg.ckpt_every == 0 or step == total:
                    save_checkpoint(ckpt_path, model, opt, step, cfg, seconds0 + now - t_start, ema)
                    saved_step = step
                if step in ints(cfg.keep_ckpts):
                    save_checkpoint(run / f"ckpt_{step}.pt", model, opt, step, cfg, seconds0 + now - t_start, ema)
                if now - t_print >= cfg.log_every or step == total or step == step0 + 1:
                    t_print, rate = now, (step - step0) / max(now - t_start, 1e-9)
                    parts = " ".join(f"{k} {v.item():.4f}" for k, v in loss.items())
                    print(f"step {step}/{total} (epoch {epoch + 1}) | {parts} | {rate * cfg.batch_size:.1f} img/s"
                          f" | eta {fmt_time((total - step) / max(rate, 1e-9))}", flush=True)
                    log.flush()
                if step == total:
                    break
    except torch.cuda.OutOfMemoryError:
        raise SystemExit(f"CUDA out of memory at step {step + 1}: try a smaller --batch-size, --amp, "
                         f"or a smaller --img-size / --base-channels. Last checkpoint: step {saved_step}")
    finally:
        log.close()
    train_seconds = seconds0 + time.time() - t_start
    print(f"trained {step - step0} steps in {fmt_time(train_seconds)}; evaluating the final model on the test split")
    if ema is not None:
        model.denoiser.load_state_dict(ema.state_dict())
    if cfg.bn_recal:  # saved in the checkpoint, so that eval and predict use the same statistics
        recalibrate_bn(model, cfg, trainset, device, cfg.bn_recal)
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        state["seg"] = model.seg.state_dict()
        torch.save(state, ckpt_path.with_name("ckpt.pt.tmp"))
        os.replace(ckpt_path.with_name("ckpt.pt.tmp"), ckpt_path)
    res = evaluate_model(model, cfg, cfg.data, ints(cfg.eval_t), device)
    res["train_seconds"] = round(train_seconds, 1)
    write_metrics(run / "metrics.json", res, cfg)
    return run


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------- Alg. 2: inference and evaluation

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_inference(model, images, cfg, ts, device, seed, keep_restorations=False):
    """Alg. 2 over images (N,3,H,W) in [0, 1], in batches of cfg.eval_batch, both time steps batched.
    Returns maps (N,H,W) and scores (N,) as numpy, the squared error of each restoration (N,K) per time
    step, and the restorations at ts[0] in [0, 1] (N,3,H,W) if asked."""
    g = torch.Generator(device=device).manual_seed(seed)  # evaluation noise: reproducible
    maps, scores, mse, restored = [], [], [], []
    model.eval().to(memory_format=torch.channels_last if cfg.amp else torch.contiguous_format)  # bf16 likes NHWC
    with torch.inference_mode(), autocast(cfg, device):
        for i in range(0, len(images), cfg.eval_batch):
            x0 = to_model(images[i: i + cfg.eval_batch].to(device), cfg)
            noise = torch.randn((len(ts) * len(x0), *x0.shape[1:]), generator=g, device=device)
            m, s, x0_hat = model.anomaly_maps(x0, ts, noise)
            x0_hat = from_model(x0_hat.float(), cfg).view(-1, *x0.shape)  # (K,B,3,H,W) in [0, 1]
            maps.append(m.float().cpu())
            scores.append(s.float().cpu())
            mse.append((x0_hat - from_model(x0.float(), cfg)).pow(2).mean((2, 3, 4)).t().cpu())  # (B,K)
            if keep_restorations:
                restored.append(x0_hat[0].cpu())
    return (torch.cat(maps).numpy(), torch.cat(scores).numpy(), torch.cat(mse).numpy(),
            torch.cat(restored) if keep_restorations else None)


def evaluate_model(model, cfg, data_path, ts, device, maps_dir=None):
    test = data.open_dataset(data_path, "test", cfg.img_size, foreground=cfg.foreground)
    items = [test[i] for i in range(len(test))]  # read every file first: file reading is not timed
    if not items:
        raise SystemExit(f"{data_path}: the test split is empty")
    images = torch.stack([it["image"] for it in items])  # (N,3,H,W)
    masks = np.stack([it["mask"][0].numpy() for it in items])  # (N,H,W)
    labels = np.array([it["label"] for it in items])
    run_inference(model, images[: cfg.eval_batch], cfg, ts, device, cfg.seed)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    maps, scores, mse, restored = run_inference(model, images, cfg, ts, device, cfg.seed, maps_dir is not None)
    sync(device)
    fps = len(images) / (time.perf_counter() - t0)
    res = metrics.evaluate(maps, masks, labels, scores)
    if model.denoiser is not None and model.ablation != "ae" and (labels == 0).any():  # restoration of good images
        psnr = -10 * np.log10(np.maximum(mse[labels == 0], 1e-10)).mean(0)
        res["restoration_psnr_good"] = {str(t): round(float(p), 2) for t, p in zip(ts, psnr)}
    res.update(fps=round(fps, 3), n_test_good=int((labels == 0).sum()), n_test_anomalous=int((labels == 1).sum()),
               eval_t=list(ts), data=str(data_path), device=str(device))
    print(f"{data_path} (t = {','.join(map(str, ts))}, {len(images)} test images: {res['n_test_good']} good, "
          f"{res['n_test_anomalous']} anomalous)")
    print("  Image AUROC  Pixel AUROC  Pixel PRO  Image AP  Pixel AP    FPS")
    print("  " + "  ".join(f"{100 * res[k]:>{w}.1f}" for k, w in
                           (("image_auroc", 11), ("pixel_auroc", 11), ("pixel_pro", 9), ("image_ap", 8), ("pixel_ap", 8)))
          + f"  {fps:>5.1f}")
    if "restoration_psnr_good" in res:
        print("  restoration PSNR of the good test images (dB): "
              + ", ".join(f"t={t} {p:.1f}" for t, p in res["restoration_psnr_good"].items()))
    print(f"  FPS = test images/s through both networks at all time steps incl. the top-{cfg.top_k} score, "
          f"batch {cfg.eval_batch} on {device}, after a warm-up, file reading excluded")
    if maps_dir is not None:
        maps_dir.mkdir(parents=True, exist_ok=True)
        for it, img, rec, m in zip(items, images, restored, maps):
            panel = [to_uint8(img), to_uint8(rec), heatmap(m), to_uint8(it["mask"].expand(3, -1, -1))]
            save_png(maps_dir / f"{it['defect']}_{Path(it['path']).stem}.png", np.concatenate(panel, axis=1))
        print(f"  wrote {len(items)} panels (input | restoration at t={ts[0]} | map | ground truth) to {maps_dir}")
    return res


def write_metrics(path, res, cfg):
    clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in res.items()}
    clean["config"] = asdict(cfg)
    path.write_text(json.dumps(clean, indent=2))
    print(f"  wrote {path}")


def to_uint8(x):
    """(3,H,W) tensor in [0, 1] -> (H,W,3) uint8."""
    return (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def heatmap(m):
    """(H,W) map in [0, 1] -> (H,W,3) uint8, blue (normal) to red (anomalous)."""
    v = np.clip(m, 0, 1)[..., None]
    rgb = np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1)  # a jet-like colour scale
    return (rgb * 255 + 0.5).astype(np.uint8)


def save_png(path, array):
    from PIL import Image
    Image.fromarray(array).save(path)


def open_run(a):
    """CLI arguments -> (model in eval mode, its config with the eval overrides, device, checkpoint path, state)."""
    path = Path(a.ckpt) if a.ckpt else (Path(a.run) / "ckpt.pt" if getattr(a, "run", None) else latest_run())
    state, cfg = load_checkpoint(path)
    cfg = check_config(replace(cfg, device=a.device, amp=a.amp, eval_t=a.t or cfg.eval_t,
                               eval_batch=a.batch or cfg.eval_batch))
    device = pick_device(cfg)
    model = build_model(cfg, state, device, use_ema=cfg.ema > 0).eval()
    if getattr(a, "bn_recal", None):
        recalibrate_bn(model, cfg, make_trainset(cfg), device, a.bn_recal)
    return model, cfg, device, path, state


def evaluate_cmd(a):
    model, cfg, device, path, state = open_run(a)
    print(f"evaluating {path} (step {state['step']})")
    res = evaluate_model(model, cfg, a.data or cfg.data, ints(cfg.eval_t), device,
                         path.parent / "maps" if a.save_maps else None)
    res["train_seconds"] = round(state.get("seconds", 0.0), 1)
    write_metrics(Path(a.json) if a.json else path.parent / "metrics.json", res, cfg)


def predict_cmd(a):
    model, cfg, device, path, _ = open_run(a)
    files = []
    for p in map(Path, a.inputs):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in data.IMG_EXTS)
            if not found:
                raise SystemExit(f"{p}: no image files ({', '.join(sorted(data.IMG_EXTS))}) in this folder")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise SystemExit(f"{p}: no such file or folder")
    out = Path(a.out) if a.out else path.parent / "predictions"
    out.mkdir(parents=True, exist_ok=True)
    stream = open(a.csv, "w", newline="") if a.csv else sys.stdout
    writer = csv.writer(stream)
    writer.writerow(["path", "score", "heatmap"])
    used = set()
    for i in range(0, len(files), 64):  # a chunk of files at a time: any folder size fits in memory
        images = torch.stack([data.load_image(f, cfg.img_size) for f in files[i: i + 64]])
        maps, scores, _, _ = run_inference(model, images, cfg, ints(cfg.eval_t), device, cfg.seed + i)
        for f, img, m, s in zip(files[i: i + 64], images, maps, scores):
            png = out / (f"{f.stem}_map.png" if f.stem not in used else f"{f.parent.name}_{f.stem}_{len(used)}_map.png")
            used.add(f.stem)
            save_png(png, np.concatenate([to_uint8(img), heatmap(m)], axis=1))
            writer.writerow([str(f), f"{s:.6f}", str(png)])
    if a.csv:
        stream.close()
        print(f"wrote scores of {len(files)} images to {a.csv} and heatmaps to {out}")


# ----------------------------------------------------------------------------- benchmark

def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (Linux: KiB)


def timed(fn, device, warmup=True):
    if warmup:
        fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bench(cfg, n_images, train_size):
    """Training samples/s and peak memory; inference images/s of the authors' naive path and ours."""
    device = pick_device(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(check_config(replace(cfg, img_size=train_size)), device=device).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x0 = torch.rand(cfg.batch_size, 3, train_size, train_size, device=device)
    mask = (torch.rand(cfg.batch_size, 1, train_size, train_size, device=device) > 0.9).float()

    def train_step():
        with autocast(cfg, device):
            loss = model.losses(x0, mask, cfg.batch_size // 2, torch.Generator().manual_seed(0))["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    step_s = min(timed(train_step, device) for _ in range(2))
    print(f"training step, {train_size}x{train_size}, batch {cfg.batch_size}, base {cfg.base_channels}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, {device}{', bf16' if cfg.amp else ''}: "
          f"{cfg.batch_size / step_s:.2f} samples/s, peak memory {peak_memory_mb(device):.0f} MiB"
          f"{'' if device.type == 'cuda' else ' (process peak RSS)'}")
    model = opt = None  # free the training model before the inference one is built

    model, ts = build_model(check_config(cfg), device=device).eval(), ints(cfg.eval_t)
    images = torch.rand(n_images, 3, cfg.img_size, cfg.img_size)
    noise = torch.randn(n_images, len(ts), 3, cfg.img_size, cfg.img_size, device=device)

    def naive():  # the authors' evaluation: one image and one time step at a time, autograd on, fp32
        for i in range(n_images):
            x0 = to_model(images[i: i + 1].to(device), cfg)
            m = torch.stack([model.anomaly_maps(x0, (t,), noise[i, k: k + 1])[0] for k, t in enumerate(ts)]).mean(0)
            m.flatten(1).topk(cfg.top_k, dim=1).values.mean(1).item()
    amp, cfg.amp = cfg.amp, False
    naive_fps = n_images / timed(naive, device)
    ours_fps = n_images / timed(lambda: run_inference(model, images, cfg, ts, device, cfg.seed), device)
    print(f"inference, {cfg.img_size}x{cfg.img_size}, base {cfg.base_channels}, t = {cfg.eval_t}, {n_images} "
          f"images, {device}:\n  naive (1 image, time steps in turn, autograd on): {naive_fps:.2f} images/s\n"
          f"  shipped (batch {cfg.eval_batch}, time steps batched, inference_mode): {ours_fps:.2f} images/s "
          f"({ours_fps / naive_fps:.2f}x)")
    if amp:
        cfg.amp = True
        amp_fps = n_images / timed(lambda: run_inference(model, images, cfg, ts, device, cfg.seed), device)
        print(f"  shipped with bf16 autocast, channels_last: {amp_fps:.2f} images/s ({amp_fps / naive_fps:.2f}x)")


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
    preset = CPU_PRESET if a.preset == "cpu" else {}
    return Config(**{**preset, **given})


def main(argv=None):
    p = argparse.ArgumentParser(prog="diffusionad.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="Alg. 1: train on the normal images of --data", allow_abbrev=False)
    add_config_flags(t)
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    e = sub.add_parser("eval", help="Alg. 2 on the test split: metrics, FPS, optional map panels", allow_abbrev=False)
    e.add_argument("--run", help="run folder (default: the most recent under runs/)")
    e.add_argument("--ckpt", help="checkpoint file (instead of --run)")
    e.add_argument("--data", help="test data (default: the training data)")
    e.add_argument("--t", help="time steps, e.g. 100,200 (default: the run's --eval-t)")
    e.add_argument("--batch", type=int, help="images per inference batch")
    e.add_argument("--save-maps", action="store_true", help="PNG panels: input | restoration | map | truth")
    e.add_argument("--json", help="where to write the metrics (default: <run>/metrics.json)")
    e.add_argument("--device", default="auto")
    e.add_argument("--amp", action="store_true", help="bf16 autocast")
    e.add_argument("--bn-recal", type=int, default=0, help="first re-estimate the seg net's BatchNorm statistics "
                   "on this many training batches at the inference time steps (ours)")
    r = sub.add_parser("predict", help="score your own images, write heatmaps", allow_abbrev=False)
    r.add_argument("inputs", nargs="+", help="image files or folders")
    r.add_argument("--ckpt", help="checkpoint file (default: the most recent run)")
    r.add_argument("--out", help="folder for heatmap PNGs (default: <run>/predictions)")
    r.add_argument("--csv", help="write the scores here instead of stdout")
    r.add_argument("--t", help="time steps (default: the run's --eval-t)")
    r.add_argument("--batch", type=int, help="images per inference batch")
    r.add_argument("--device", default="auto")
    r.add_argument("--amp", action="store_true", help="bf16 autocast")
    b = sub.add_parser("bench", help="inference and training speed at the paper's configuration", allow_abbrev=False)
    add_config_flags(b)
    b.add_argument("--n-images", type=int, default=8, help="test images for the inference timing")
    b.add_argument("--train-size", type=int, default=128, help="image size for the training-step timing")
    a = p.parse_args(argv)
    if a.cmd == "train":
        train(config_from(a), resume=a.resume)
    elif a.cmd == "eval":
        evaluate_cmd(a)
    elif a.cmd == "predict":
        predict_cmd(a)
    else:
        bench(check_config(config_from(a)), a.n_images, a.train_size)


if __name__ == "__main__":
    main()
