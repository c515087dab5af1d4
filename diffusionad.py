"""DiffusionAD in one file: anomaly detection as noise-to-norm.

Zhang et al., "DiffusionAD: Norm-guided One-step Denoising Diffusion for Anomaly Detection" (2023).
A query image x0 is corrupted with Gaussian noise (Eq. 2), a denoising UNet predicts the noise and a
flawless approximation x0_hat is restored in ONE step (Eq. 5); a segmentation UNet compares
cat(x0, x0_hat) and outputs a pixel-wise anomaly map. Training (Alg. 1) uses normal images plus
synthetic anomalies (data.py, Sec. 3.3); inference (Alg. 2) averages the maps at t = 100 and t = 200 and
scores an image by the mean of its top-50 map values.

Read top to bottom: Config -> schedule (Eq. 1-2) -> denoiser -> segmentation net -> DiffusionAD (Eq. 2,
5-8, Alg. 1's losses, Alg. 2) -> Alg. 1 as a training loop -> Alg. 2's evaluation -> the command line.
The model part (down to DiffusionAD) needs torch alone; run plumbing is in runs.py, data in data.py,
metrics in metrics.py. Deviations from the paper and the authors' code: README.md, "Deviations".
"""
import math
import sys
import time
from dataclasses import dataclass, field
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
    """The method. Every field is a flag (`img_size` -> `--img-size`); defaults are the paper's (Sec. 4.2), and the
    authors' released code where the paper is silent. How a run is done (data, device, run folder...) is
    runs.RunOptions."""
    img_size: int = arg(256, "image side, Sec. 4.2")
    crop: int = arg(0, "if > 0, train on crops of this side that keep part of the anomaly; eval whole images (ours)")
    pixel_range: str = arg("0,1", "range fed to the networks, '0,1' or '-1,1' (authors' code: 0,1)")
    clamp: str = arg("-1,1", "x0_hat's range before the seg net (authors' code: -1,1 on images in 0,1; ours: 0,1)")
    foreground: str = arg("auto", "synthesis foreground: auto|mask|object|texture|none (data.py, Sec. 3.3)")
    texture_dir: str = arg("", "anomaly source textures such as DTD (Sec. 3.3): textures use them alone, objects half "
                           "the time, self-augmentation otherwise (authors' code); empty = self-augmentation")
    anomaly_shape: str = arg("perlin", "synthetic anomaly masks: perlin (paper) | curves (thin scratch-like "
                             "strokes) | mixed (half each) | small (PCB-sized spots and strokes) (ours; data.py)")
    anomaly_fill: str = arg("blend", "synthetic anomaly content: blend (Eq. 9, paper) | invert (1 - N inside the mask: "
                            "the other material of a binarised image such as a PCB scan; ours)")
    timesteps: int = arg(1000, "T, Sec. 4.2; time steps t = 0..T-1 (Eq. 2, authors' code)")
    train_t: int = arg(0, "Alg. 1 draws t ~ U{0..train_t-1}; 0 = T (paper; the authors' later code: < 300)")
    beta_schedule: str = arg("linear", "linear (Eq. 1, paper) | cosine (in the authors' code; for imported models)")
    beta_start: float = arg(1e-4, "beta_0 of the linear schedule, Sec. 4.2")
    beta_end: float = arg(0.02, "beta_{T-1} of the linear schedule: 0.02 as DDPM and the authors' code (paper text: 1e-2)")
    base_channels: int = arg(128, "denoiser width, Sec. 4.2 (--ablation ae: the autoencoder's, DRAEM: 128)")
    channel_mult: str = arg("", "denoiser level multipliers; empty = by size, 1,1,2,2,4,4 at 256 (authors' code)")
    num_res_blocks: int = arg(2, "residual blocks per level (authors' code)")
    attn_resolutions: str = arg("32,16,8", "self-attention resolutions, Sec. 4.2 (and the middle block); '' = no "
                                "attention, a fully convolutional denoiser (ours: for --crop training)")
    num_heads: int = arg(4, "attention heads, Sec. 4.2")
    num_head_channels: int = arg(-1, "if > 0, channels per attention head instead of --num-heads (authors' code)")
    dropout: float = arg(0.0, "denoiser dropout (authors' code)")
    seg_channels: int = arg(64, "segmentation net base width (DRAEM's discriminative net, the authors' code)")
    gamma: float = arg(5.0, "focal-loss weight in L_mask, Eq. 7 / Sec. 4.2")
    batch_size: int = arg(6, "images per step, half normal, half synthetic from other normal images: 3 + 3, Sec. 4.2")
    lr: float = arg(1e-4, "Adam learning rate, one optimizer over both networks, Sec. 4.2")
    lr_schedule: str = arg("constant", "constant (paper) | cosine: decay to 0 at the last step of "
                             "max_steps/epochs (ours; a resume with more steps stretches the decay)")
    seg_grad: str = arg("full", "the mask loss's gradient into the denoiser through Eq. 5: full (paper) | none (ours)")
    denoiser_warmup: int = arg(0, "the first N steps train the denoiser alone (L_noise), then Eq. 8's joint loss (ours)")
    epochs: int = arg(500, "training epochs (each normal image once per epoch, as a normal or a synthetic one), Sec. 4.2")
    max_steps: int = arg(0, "if > 0, train this many steps instead of `epochs` (ours, for CPU budgets)")
    eval_t: str = arg("100,200", "inference time steps whose maps are averaged, Sec. 4.2 / Table 4")
    top_k: int = arg(50, "image score = mean of the top-K map values, Sec. 3.4")
    ablation: str = arg("none", "Table 3: none | seg-only | ae (DRAEM+: DRAEM's autoencoder, L2 + SSIM) | denoise-only")
    seed: int = arg(0, "seed for weights, batches, training noise and evaluation noise")


def ints(text):
    return tuple(int(v) for v in str(text).split(",") if v.strip())


# ----------------------------------------------------------------------------- schedule (Eq. 1-2), pixel range

def to_model(x, cfg):
    """data.py yields images in [0, 1]; the networks see cfg.pixel_range."""
    return x * 2.0 - 1.0 if cfg.pixel_range == "-1,1" else x


def from_model(x, cfg):
    return ((x + 1.0) / 2.0 if cfg.pixel_range == "-1,1" else x).clamp(0, 1)


def make_schedule(cfg):
    """alpha_bar_t = prod_{i=0}^{t} (1 - beta_i) for t = 0..T-1, as the paper writes it and the authors' code
    indexes it (t = 0 is one step of noise; the network receives this t). In float64, stored as float32 (T,)."""
    T = cfg.timesteps
    if cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)  # Eq. (1)
    else:  # cosine: alpha_bar follows cos^2 (Nichol & Dhariwal 2021), each beta at most 0.999
        f = lambda s: torch.cos((s / T + 0.008) / 1.008 * math.pi / 2) ** 2
        s = torch.arange(T, dtype=torch.float64)
        betas = (1 - f(s + 1) / f(s)).clamp(max=0.999)
    alphas_bar = torch.cumprod(1.0 - betas, 0)  # Eq. (2)
    return alphas_bar.sqrt().float(), (1.0 - alphas_bar).sqrt().float()


def extract(a, t):
    """a[t] shaped (B, 1, 1, 1) to broadcast over images."""
    return a.to(t.device)[t].view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------- denoiser eps_theta(x_t, t)
# The authors' UNetModel (guided diffusion's UNet as AnoDDPM uses it), module for module: state_dict keys and
# shapes are theirs, so their checkpoints load as they are (import-authors).

def channel_mult(cfg):
    if cfg.channel_mult:
        return ints(cfg.channel_mult)
    by_size = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4), 32: (1, 2, 3, 4)}  # authors' code
    if cfg.img_size not in by_size:
        raise ValueError(f"no default --channel-mult for --img-size {cfg.img_size}; pass one, e.g. 1,2,2,4")
    return by_size[cfg.img_size]


def norm(ch):
    """GroupNorm with 32 groups (authors' code); fewer when the width is not a multiple of 32 (ours: small models)."""
    return nn.GroupNorm(math.gcd(32, ch), ch)


def zero(module):
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of integer steps t (B,) -> (B, dim): sines, then cosines."""
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000) / half))
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


def resample(x, how):
    """BigGAN-style resampling without a convolution: nearest-neighbour x2 up, 2x2 average pooling down."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest") if how == "up" else F.avg_pool2d(x, 2)


class ResBlock(nn.Module):
    """norm-SiLU-conv, + the time embedding, norm-SiLU-dropout-conv (zero-initialised), + skip. how="up"/"down":
    both paths are resampled between the first SiLU and the first convolution."""
    def __init__(self, cin, cout, emb_dim, dropout, how=None):
        super().__init__()
        self.how = how
        self.in_layers = nn.Sequential(norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.embed_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(norm(cout), nn.SiLU(), nn.Dropout(dropout),
                                        zero(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers[1](self.in_layers[0](x))
        if self.how:
            h, x = resample(h, self.how), resample(x, self.how)
        h = self.in_layers[2](h) + self.embed_layers(emb)[:, :, None, None]  # time step added in every block
        return self.skip_connection(x) + self.out_layers(h)


class Attention(nn.Module):
    """Self-attention over positions: norm, 1x1 conv to q, k, v (each head's in turn), softmax(q k^T / sqrt(d)) v,
    a zero-initialised 1x1 output projection, residual."""
    def __init__(self, ch, heads):
        super().__init__()
        self.heads, self.norm = heads, norm(ch)
        self.to_qkv = nn.Conv1d(ch, 3 * ch, 1)
        self.proj_out = zero(nn.Conv1d(ch, ch, 1))

    def forward(self, x):
        B, C, H, W = x.shape
        x = x.reshape(B, C, H * W)
        qkv = self.to_qkv(self.norm(x)).reshape(B, self.heads, 3, C // self.heads, H * W)
        q, k, v = qkv.transpose(-1, -2).unbind(2)  # each (B, heads, HW, C/heads)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        return (x + self.proj_out(h.transpose(-1, -2).reshape(B, C, H * W))).reshape(B, C, H, W)


class Step(nn.Module):
    """One UNet stage: layers applied in order, residual blocks also receive the time embedding."""
    def __init__(self, *layers):
        super().__init__()
        for i, layer in enumerate(layers):
            self.add_module(str(i), layer)

    def forward(self, x, emb):
        for layer in self.children():
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class DenoisingUNet(nn.Module):
    """(B,3,H,W), (B,) -> predicted noise (B,3,H,W). Per level: num_res_blocks residual blocks (with attention at
    attn_resolutions), then a downsampling residual block; the middle: block, attention, block; the way up mirrors
    it with one block more per level, each fed the matching skip, and an upsampling residual block."""
    def __init__(self, cfg):
        super().__init__()
        ch, mult, attn = cfg.base_channels, channel_mult(cfg), set(ints(cfg.attn_resolutions))
        block = lambda cin, cout, how=None: ResBlock(cin, cout, 4 * ch, cfg.dropout, how)
        attention = lambda c: Attention(c, c // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads)
        self.time_embedding = nn.Sequential(TimeEmbedding(ch), nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))
        self.down, skips, cur, res = nn.ModuleList([Step(nn.Conv2d(3, ch, 3, padding=1))]), [ch], ch, cfg.img_size
        for level, m in enumerate(mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Step(block(cur, m * ch), *([attention(m * ch)] if res in attn else [])))
                cur = m * ch
                skips.append(cur)
            if level < len(mult) - 1:
                self.down.append(Step(block(cur, cur, "down")))
                skips.append(cur)
                res //= 2
        mid_attn = [attention(cur)] if attn else []  # none: fully convolutional (ours, for --crop)
        self.middle = Step(block(cur, cur), *mid_attn, block(cur, cur))
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [block(cur + skips.pop(), m * ch)] + ([attention(m * ch)] if res in attn else [])
                cur = m * ch
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(block(cur, cur, "up"))
                    res *= 2
                self.up.append(Step(*layers))
        self.out = nn.Sequential(norm(cur), nn.SiLU(), zero(nn.Conv2d(cur, 3, 3, padding=1)))

    def forward(self, x, t):
        emb = self.time_embedding(t)  # (B, 4*base)
        h, hs = x, []
        for step in self.down:
            h = step(h, emb)
            hs.append(h)
        h = self.middle(h, emb)
        for step in self.up:
            h = step(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


# ----------------------------------------------------------------------------- segmentation sub-network

def cbr(cin, cout):
    """3x3 convolution, BatchNorm, ReLU (as a list, to splice into a Sequential)."""
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SegmentationUNet(nn.Module):
    """DRAEM's discriminative sub-network, as the authors use it: cat(x0, x0_hat) (B,6,H,W) -> mask logits (B,1,H,W).
    6 encoder levels of two conv-BN-ReLU (w, 2w, 4w, 8w, 8w, 8w), max-pooled between; 5 decoder levels of a bilinear
    x2 upsampling with conv-BN-ReLU to 8w, 4w, 2w, w, w, the skip concatenated, two conv-BN-ReLU; a 3x3 conv to 1."""
    def __init__(self, in_ch, base):
        super().__init__()
        enc = [base * min(2 ** i, 8) for i in range(6)]  # 64, 128, 256, 512, 512, 512 at base 64
        dec = [enc[max(i - 1, 0)] for i in range(5)] + [enc[5]]  # 64, 64, 128, 256, 512 (+ the bottleneck's 512)
        self.enc = nn.ModuleList(nn.Sequential(*cbr(in_ch if i == 0 else enc[i - 1], enc[i]), *cbr(enc[i], enc[i]))
                                 for i in range(6))
        self.up = nn.ModuleList(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                                              *cbr(dec[i + 1], dec[i])) for i in reversed(range(5)))
        self.dec = nn.ModuleList(nn.Sequential(*cbr(dec[i] + enc[i], dec[i]), *cbr(dec[i], dec[i]))
                                 for i in reversed(range(5)))
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


class Autoencoder(nn.Module):
    """DRAEM's reconstructive sub-network, for DRAEM+ (Table 3), no skip connections: 5 encoder levels of two
    conv-BN-ReLU (w, 2w, 4w, 8w, 8w), max-pooled between; 4 decoder levels of a bilinear x2 upsampling with
    conv-BN-ReLU, then two conv-BN-ReLU, the second narrowing (8w->4w->2w->w->w); a 3x3 convolution to 3 channels."""
    def __init__(self, base):
        super().__init__()
        enc = [base * min(2 ** i, 8) for i in range(5)]  # 128, 256, 512, 1024, 1024 at base 128
        wide, narrow = enc[3::-1], enc[2::-1] + [base]  # 1024, 512, 256, 128 -> 512, 256, 128, 128
        self.enc = nn.ModuleList(nn.Sequential(*cbr(3 if i == 0 else enc[i - 1], enc[i]), *cbr(enc[i], enc[i]))
                                 for i in range(5))
        self.up = nn.ModuleList(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                                              *cbr(w, w)) for w in wide)
        self.dec = nn.ModuleList(nn.Sequential(*cbr(w, w), *cbr(w, n)) for w, n in zip(wide, narrow))
        self.out = nn.Conv2d(base, 3, 3, padding=1)

    def forward(self, x):
        for i, block in enumerate(self.enc):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
        for up, dec in zip(self.up, self.dec):
            x = dec(up(x))
        return self.out(x)


# ----------------------------------------------------------------------------- the model and its losses

def focal_loss(logits, target, alpha=0.5, focusing=4.0):
    """Binary focal loss from logits, the authors' constants: mean of alpha * (1 - p_t)^4 * -log(p_t)."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # -log p_t
    return (alpha * (1.0 - torch.exp(-ce)) ** focusing * ce).mean()


def ssim_loss(x, y, data_range):
    """1 - SSIM (Wang et al. 2004) as DRAEM trains its autoencoder with it: an 11x11 Gaussian window (sigma 1.5) per
    channel, zero padding, C1 = (0.01 L)^2, C2 = (0.03 L)^2 for the data range L, the mean over all pixels."""
    g = torch.exp(-(torch.arange(11, dtype=x.dtype, device=x.device) - 5) ** 2 / (2 * 1.5 ** 2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2).expand(x.shape[1], 1, 11, 11)
    blur = lambda z: F.conv2d(z, w, padding=5, groups=x.shape[1])
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim = (2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return 1.0 - ssim.mean()


class DiffusionAD(nn.Module):
    """Both sub-networks plus the schedule. `ablation` selects a Table 3 variant."""
    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.ablation = cfg, cfg.ablation
        self.clamp = tuple(float(v) for v in cfg.clamp.split(","))  # x0_hat's range (authors' code: -1, 1)
        self.denoiser = (None if cfg.ablation == "seg-only" else Autoencoder(cfg.base_channels) if cfg.ablation == "ae"
                         else DenoisingUNet(cfg))
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
        if self.ablation == "ae":  # DRAEM+: the autoencoder reconstructs x0 directly
            return self.denoiser(x0).clamp(*self.clamp), None
        x_t = self.q_sample(x0, t, eps)  # Alg. 1 / Alg. 2: corrupt
        eps_hat = self.denoiser(x_t, t)  # Alg. 1 / Alg. 2: predict the noise
        x0_hat = self.predict_x0(x_t, t, eps_hat)  # Eq. (5): one step back to x0
        return x0_hat.clamp(*self.clamp), eps_hat

    def segment(self, x0, x0_hat):
        """Mask logits (B,1,H,W) from cat(x0, x0_hat); the seg-only ablation sees x0 alone."""
        return self.seg(x0 if self.ablation == "seg-only" else torch.cat([x0, x0_hat], dim=1))

    def losses(self, x0, mask, n_normal, generator, joint=True, source=None):
        """Alg. 1 on one batch. x0 (B,3,H,W): n_normal normal images first, then synthetic ones; mask (B,1,H,W).
        source: the anomaly-free image of each (needed by the AE ablation alone). joint=False: L_noise alone
        (ours: --denoiser-warmup)."""
        B, T = x0.shape[0], self.cfg.train_t or self.cfg.timesteps
        t = torch.randint(0, T, (B,), generator=generator).to(x0.device)  # Alg. 1: t ~ U{0..T-1}
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)  # Alg. 1: eps ~ N(0, I)
        out, x0_hat = {}, None
        if self.denoiser is not None:
            x0_hat, eps_hat = self.restore(x0, t, eps)
            if self.ablation == "ae":  # DRAEM+: reconstruct the normal image under the anomaly, L2 + SSIM (DRAEM)
                data_range = 2.0 if self.cfg.pixel_range == "-1,1" else 1.0
                out["rec"] = F.mse_loss(x0_hat, source) + ssim_loss(x0_hat, source, data_range)
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

    def forward(self, x0, mask, n_normal, generator, joint=True, source=None):
        """Calling the model is Alg. 1 (so that DistributedDataParallel can wrap it)."""
        return self.losses(x0, mask, n_normal, generator, joint, source)

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
            maps = (x0k - x0_hat).abs().mean(1).float()
        else:  # Alg. 2: M_hat, (K*B,H,W); the sigmoid in float32 (a bf16 one would quantise the map)
            maps = torch.sigmoid(self.segment(x0k, x0_hat).float())[:, 0]
        maps = maps.view(K, B, *maps.shape[1:]).mean(0)  # Alg. 2: average over time steps
        return maps, self.image_score(maps), x0_hat

    def image_score(self, maps):
        """Alg. 2: an image's score is the mean of its top-K map values. maps (B,H,W) -> (B,)."""
        return maps.flatten(1).topk(min(self.cfg.top_k, maps[0].numel()), dim=1).values.mean(1)


def build_model(cfg, state=None, device="cpu"):
    """The model, with a checkpoint's weights if given (ValueError when they do not fit the config)."""
    model = DiffusionAD(cfg)
    for name in ("denoiser", "seg"):
        net = getattr(model, name)
        if state is not None and net is not None:
            try:
                net.load_state_dict(state[name])
            except RuntimeError as e:
                raise ValueError(f"checkpoint weights of the {name} do not fit its config: {str(e)[:500]}") from None
    return model.to(device)


# ----------------------------------------------------------------------------- Alg. 1: training

def lr_at(step, cfg, total):
    """Learning rate of 0-based `step` of `total`: constant (paper) or cosine decay to 0 at the last step (ours)."""
    return cfg.lr if cfg.lr_schedule == "constant" else cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))


def train(cfg, opts, resume=False):
    """Alg. 1 on the normal images of opts.data, then the final evaluation. runs.Run does the plumbing: run
    folder, data, device, resuming, compile and torchrun, the loss log, checkpoints, Ctrl-C, --max-minutes."""
    import runs
    with runs.Run(cfg, opts, resume, Config) as run:
        torch.manual_seed(cfg.seed)  # weights (and dropout)
        model = run.place(trained_model(cfg, run.state))
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=run.device.type == "cuda")  # both nets, Sec. 4.2
        step, losses = run.start(model, opt)  # step > 0 when resuming; losses: the model, compiled/parallel if asked
        model.train()
        for batch in run.batches(step):  # 6 distinct normal images: 3 as they are, 3 made synthetic (Sec. 3.3)
            x0, mask = to_model(batch["image"], cfg), batch["mask"]  # normal first, then synthetic
            source = to_model(batch["source"], cfg) if cfg.ablation == "ae" else None  # DRAEM+'s targets
            x0, mask, source, g = run.inputs(x0, mask, source, step)  # on the device, cropped if asked; step's noise
            with runs.autocast(opts, run.device):
                loss = losses(x0, mask, cfg.batch_size // 2, g, step >= cfg.denoiser_warmup, source)  # Eq. (6)-(8)
            opt.zero_grad(set_to_none=True)
            loss["total"].backward()
            lr = lr_at(step, cfg, run.total)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()  # Alg. 1: one gradient step on both networks
            step += 1
            if run.after_step(step, loss, lr):  # log and checkpoints; True after Ctrl-C or --max-minutes
                break
        run.end()
        if run.rank == 0:
            final_evaluation(model, cfg, opts, run)
    return run.folder


def final_evaluation(model, cfg, opts, run):
    """After Alg. 1: the decision threshold from the held-out normal images (stored in the checkpoint), then
    Alg. 2 on the test split when there is one. Writes metrics.json."""
    import runs
    threshold, res = None, {}
    if run.held_out is not None:
        threshold = held_out_threshold(model, run.held_out, cfg, opts, run.device)
        run.checkpoint(run.ckpt_path, threshold)
    if run.test is not None:
        res = evaluate(model, cfg, opts, run.test, run.device, opts.test or opts.data, threshold)
    else:
        print(f"{opts.data}: no test split (a plain folder without --test): the threshold only")
    res.update(threshold=threshold, train_seconds=round(run.train_seconds, 1), steps=run.step)
    runs.write_metrics(run.folder / "metrics.json", res, cfg, opts)
    if opts.compile:
        print("  " + runs.compile_report() + " (training and evaluation)")


def held_out_threshold(model, held_out, cfg, opts, device):
    """The decision threshold: the opts.threshold_quantile quantile of the held-out normal images' scores."""
    import runs
    images = torch.stack([held_out[i]["image"] for i in range(len(held_out))])
    return runs.threshold_summary(run_inference(model, images, cfg, opts, device)[1], opts.threshold_quantile, cfg)


# ----------------------------------------------------------------------------- Alg. 2: inference and evaluation

def inference_noise(seed, n_steps, size, device="cpu"):
    """Alg. 2's noise: one draw eps_k ~ N(0, I) of shape (3, size, size) per time step, from the seed on the
    CPU generator, the same for every image on every device: an image's score does not depend on the batch
    it is in, and an exported program can hold the noise. (K, 3, size, size)."""
    return torch.randn((n_steps, 3, size, size), generator=torch.Generator().manual_seed(seed)).to(device)


def run_inference(model, images, cfg, opts, device, keep_restorations=False, what="images"):
    """Alg. 2 over images (N,3,H,W) in [0, 1] at cfg.eval_t, in batches of opts.eval_batch (the last one padded,
    so every batch has one shape), all time steps batched. Returns maps (N,H,W) and scores (N,) as numpy, the
    squared error of each restoration (N,K) per time step, and the restorations at the first t (N,3,H,W) if
    asked. Prints progress with an ETA every opts.log_every seconds."""
    import runs
    ts, B, N = ints(cfg.eval_t), opts.eval_batch, len(images)
    eps = inference_noise(cfg.seed, len(ts), images.shape[-1], device)  # (K,3,H,W): the same for every image
    fmt = runs.memory_format(opts, device, inference=True)
    model.eval().to(memory_format=fmt)
    maps_fn = model.anomaly_maps
    if opts.compile:  # compiled once per model; CUDA graphs on a GPU (the batch shape never changes)
        if "compiled_maps" not in model.__dict__:
            model.__dict__["compiled_maps"] = torch.compile(
                model.anomaly_maps, mode="reduce-overhead" if device.type == "cuda" else None, dynamic=False)
        maps_fn = model.__dict__["compiled_maps"]
    maps, scores, mse, restored = [], [], [], []
    t0 = t_print = time.time()
    with torch.inference_mode(), runs.autocast(opts, device):
        for i in range(0, N, B):
            x0 = to_model(images[i: i + B].to(device, non_blocking=True), cfg)
            n = len(x0)
            x0 = torch.cat([x0, x0[-1:].expand(B - n, -1, -1, -1)]).contiguous(memory_format=fmt)  # pad to B
            m, s, x0_hat = maps_fn(x0, ts, eps.repeat_interleave(B, dim=0))  # Alg. 2
            x0_hat = from_model(x0_hat.float(), cfg).view(-1, *x0.shape)[:, :n]  # (K,n,3,H,W) in [0, 1]
            maps.append(m[:n].float().cpu())
            scores.append(s[:n].float().cpu())
            mse.append((x0_hat - from_model(x0[:n].float(), cfg)).pow(2).mean((2, 3, 4)).t().cpu())  # (n,K)
            if keep_restorations:
                restored.append(x0_hat[0].cpu())
            now = time.time()
            if now - t_print >= opts.log_every and i + n < N:
                t_print, rate = now, (i + n) / (now - t0)
                print(f"  {i + n}/{N} {what}, {rate:.1f}/s, eta {runs.fmt_time((N - i - n) / rate)}", flush=True)
    return (torch.cat(maps).numpy(), torch.cat(scores).numpy(), torch.cat(mse).numpy(),
            torch.cat(restored) if keep_restorations else None)


def maps_without_restoration(model, images, cfg, opts, device):
    """The segmentation net's maps (N,H,W) and scores (N,) with x0_hat := x0: what it finds in x0 alone. One
    segmentation pass, no restoration (the map is the same at every time step)."""
    import runs
    fmt, out = runs.memory_format(opts, device, inference=True), []
    with torch.inference_mode(), runs.autocast(opts, device):
        for i in range(0, len(images), opts.eval_batch):
            x0 = to_model(images[i: i + opts.eval_batch].to(device), cfg).contiguous(memory_format=fmt)
            out.append(torch.sigmoid(model.segment(x0, x0).float())[:, 0].cpu())  # float32, as anomaly_maps
    maps = torch.cat(out)
    return maps.numpy(), model.image_score(maps).numpy()


def evaluate(model, cfg, opts, test, device, name, threshold=None, maps_dir=None):
    """Alg. 2 on a whole test split: metrics (metrics.py), FPS, the segmentation net's reliance on the
    restoration, restoration PSNR, the threshold's verdicts; panels if maps_dir. Returns the results dict."""
    import runs
    items = [test[i] for i in range(len(test))]  # read every file first: file reading is not timed
    images = torch.stack([it["image"] for it in items])  # (N,3,H,W)
    masks = np.stack([it["mask"][0].numpy() for it in items])  # (N,H,W)
    labels = np.array([it["label"] for it in items])
    known = np.array([it.get("has_mask", True) for it in items])  # False: an anomalous image without a mask
    kept = sum(it.get("regions_kept", 0) for it in items)
    if kept:
        print(f"  {kept} defect region(s) smaller than a pixel at {cfg.img_size} px kept as one pixel each")
    run_inference(model, images[: opts.eval_batch], cfg, opts, device)  # warm-up (and compilation)
    runs.sync(device)
    t0 = time.perf_counter()
    maps, scores, mse, restored = run_inference(model, images, cfg, opts, device, maps_dir is not None, "test images")
    runs.sync(device)
    fps = len(images) / (time.perf_counter() - t0)
    res = metrics.evaluate(maps, masks, labels, scores, defects=[it["defect"] for it in items], pixel_images=known)
    res.update(fps=round(fps, 3), n_test_good=int((labels == 0).sum()), n_test_anomalous=int((labels == 1).sum()),
               n_test_without_mask=int((~known).sum()), eval_t=list(ints(cfg.eval_t)), data=str(name),
               device=str(device), regions_kept=kept)
    if model.denoiser is not None and model.seg is not None:  # the seg net's reliance on the restoration
        plain_maps, plain_scores = maps_without_restoration(model, images, cfg, opts, device)
        plain = metrics.evaluate(plain_maps, masks, labels, plain_scores, pixel_images=known)
        res["without_restoration"] = plain
        res["reliance"] = {k: None if res[k] is None else res[k] - plain[k]
                           for k in ("image_auroc", "pixel_auroc", "pixel_pro")}
    if model.denoiser is not None and (labels == 0).any():  # restoration (DRAEM+: reconstruction) of good images
        psnr = -10 * np.log10(np.maximum(mse[labels == 0], 1e-10)).mean(0)
        steps = ("reconstruction",) if model.ablation == "ae" else ints(cfg.eval_t)
        res["restoration_psnr_good"] = {str(t): round(float(p), 2) for t, p in zip(steps, psnr)}
    if threshold is not None:
        flag = lambda sel: float((scores[sel] >= threshold["value"]).mean()) if sel.any() else None
        res["flagged"] = {"threshold": threshold["value"], "good": flag(labels == 0), "anomalous": flag(labels == 1)}
    runs.print_metrics(res, cfg, opts, device)
    if maps_dir is not None:
        runs.save_panels(maps_dir, items, images, restored, maps, ints(cfg.eval_t)[0])
    return res


class Alg2Program(nn.Module):
    """Alg. 2 as one module for torch.export: images (B,3,S,S) in [0, 1] -> maps (B,S,S), scores (B,), with the
    run's fixed noise inside (inference_noise), the noise predict uses."""

    def __init__(self, model, cfg):
        super().__init__()
        self.model, self.cfg, self.ts = model, cfg, ints(cfg.eval_t)
        self.register_buffer("eps", inference_noise(cfg.seed, len(self.ts), cfg.img_size))

    def forward(self, x):
        maps, scores, _ = self.model.anomaly_maps(to_model(x, self.cfg), self.ts, self.eps.repeat_interleave(x.shape[0], 0))
        return maps, scores


# ----------------------------------------------------------------------------- command line

def trained_model(cfg, state, device="cpu"):
    try:
        return build_model(cfg, state, device)
    except ValueError as e:
        raise SystemExit(str(e))


def evaluate_cmd(a):
    import runs
    path, state, cfg, opts = runs.open_run(a, Config, channel_mult)
    out, maps_dir = runs.eval_output(a, opts, cfg, path)
    test = runs.open_test(a, opts, cfg.img_size)
    problems = data.check_split(test)
    if problems:
        raise SystemExit(f"{a.test or a.data or opts.test or opts.data}: {len(problems)} unreadable test file(s):\n  "
                         + "\n  ".join(problems[:10]))
    device = runs.pick_device(opts)
    model = trained_model(cfg, state, device).eval()
    threshold, source = runs.stored_threshold(state, cfg, path)
    if a.bn_recal:  # on the images the run trained on, never its held-out slice
        normal, held_out = runs.training_split(opts, runs.open_train(cfg, opts))
        runs.recalibrate_bn(model, cfg, opts, runs.make_trainset(cfg, opts, normal), device, a.bn_recal, to_model)
        threshold, source = None, "the run has no held-out slice (--holdout 0) to set one after recalibration"
        if held_out is not None:  # the stored threshold belongs to the model before recalibration: set it again
            threshold = held_out_threshold(model, held_out, cfg, opts, device)
    print(f"evaluating {path} (step {state['step']})")
    if threshold is None:
        print(f"  no verdicts: {source}")
    res = evaluate(model, cfg, opts, test, device, a.test or a.data or opts.test or opts.data, threshold,
                   maps_dir if a.save_maps else None)
    res.update(train_seconds=round(state.get("seconds", 0.0), 1), steps=state["step"], checkpoint=str(path))
    runs.write_metrics(out, res, cfg, opts)


def predict_cmd(a):
    import runs
    try:
        files = data.list_images(a.inputs)
    except FileNotFoundError as e:
        raise SystemExit(str(e))
    path, state, cfg, opts = runs.open_run(a, Config, channel_mult)
    device = runs.pick_device(opts)
    model = trained_model(cfg, state, device).eval()
    threshold, source = runs.stored_threshold(state, cfg, path, a.threshold)
    threshold = threshold["value"] if isinstance(threshold, dict) else threshold
    runs.predict(a, path, files, lambda x: run_inference(model, x, cfg, opts, device)[:2], cfg.img_size,
                 threshold, source)


def export_cmd(a):
    import runs
    path, state, cfg, opts = runs.open_run(a, Config, channel_mult)
    program = Alg2Program(trained_model(cfg, state).eval(), cfg).eval().requires_grad_(False)
    example = torch.rand(2, 3, cfg.img_size, cfg.img_size)
    exported = torch.export.export(program, (example,), dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},))
    threshold, source = runs.stored_threshold(state, cfg, path)
    runs.export_files(a.out, exported, {
        "checkpoint": str(path), "threshold": None if threshold is None else threshold["value"],
        "threshold_rule": threshold or source, "img_size": cfg.img_size,
        "eval_t": list(ints(cfg.eval_t)), "top_k": cfg.top_k,
        "input": f"float32 (B, 3, {cfg.img_size}, {cfg.img_size}) RGB in [0, 1], resized bilinearly",
        "outputs": "maps (B, S, S) in [0, 1], scores (B,); anomalous when score >= threshold"})


def main(argv=None):
    import runs
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # docs/bench.py: plain and shipped paths side by side
        sys.path.insert(0, str(Path(__file__).resolve().parent / "docs"))
        import bench
        return bench.main(argv[1:])
    a = runs.parser(Config, __doc__.split("\n\n")[0]).parse_args(argv)
    if runs.torchrun_env()[1] > 1 and a.cmd != "train":
        raise SystemExit(f"{a.cmd} runs in one process: start it without torchrun")
    if a.cmd == "train":
        cfg, opts = runs.check(*runs.options_from(a, Config), channel_mult)
        runs.launch(cfg, opts, a.resume, train)
    elif a.cmd == "eval":
        evaluate_cmd(a)
    elif a.cmd == "predict":
        predict_cmd(a)
    elif a.cmd == "export":
        export_cmd(a)
    elif a.cmd == "import-authors":  # authors.py: their checkpoints as our run folders
        import authors
        authors.import_cmd(a)
    else:
        print(runs.write_table(a.folder))


if __name__ == "__main__":
    main()
