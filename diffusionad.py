"""DiffusionAD in one file: anomaly detection as noise-to-norm (Zhang et al., arXiv 2303.08730, 2023).

A query image x0 is corrupted with Gaussian noise (Eq. 2), a denoising UNet predicts the noise and restores a
flawless approximation x0_hat in ONE step (Eq. 5); a segmentation UNet compares cat(x0, x0_hat) and outputs a
pixel-wise anomaly map. Training (Alg. 1) uses normal images plus synthetic anomalies (data.py, Sec. 3.3);
inference (Alg. 2) averages the maps at t = 100 and 200 and scores an image by the mean of its top-50 values.

In the paper's order: Config, linear schedule (Eq. 1-2), denoising UNet, segmentation UNet, DiffusionAD (Eq. 2, 5-8,
Alg. 1, Alg. 2), build_model (torch alone to here: copy it out), training, evaluation, verbs. Deviations: README.md.
"""
import importlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics
from extras import checks, cli, options, reports, thresholds
from extras.checkpoints import load_checkpoint, open_run
from extras.distributed import torchrun_env
from extras.run import Run, launch
from extras.inference import run_inference
from extras.speed import autocast, pick_device, precision, sync


@dataclass
class Config:
    """The paper's method; every field is a flag (`img_size` -> `--img-size`), its comment the help. Defaults: the
    paper's (Sec. 4.2) but beta_end, the authors' code where the paper is silent. Ours: extras/options.py."""
    img_size: int = 256  # image side (Sec. 4.2); or (height, width): ours, for images that are not square
    timesteps: int = 1000  # T (Sec. 4.2); t = 0..T-1 index alpha_bar_t (the authors' code; Eq. 2 writes 0..T)
    beta_start: float = 1e-4  # beta_1 of the linear schedule (Eq. 1, Sec. 3.1)
    beta_end: float = 0.02  # beta_T of the linear schedule: 0.02 as DDPM and the authors' code (Sec. 3.1: 1e-2)
    base_channels: int = 128  # denoiser width (Sec. 4.2)
    channel_mult: tuple = ()  # denoiser level multipliers; empty = by size, 1,1,2,2,4,4 at 256 (the authors' code)
    num_res_blocks: int = 2  # residual blocks per level (the authors' code)
    attn_resolutions: tuple = (32, 16, 8)  # self-attention resolutions (Sec. 4.2) and the middle block; '' = none
    num_heads: int = 4  # attention heads (Sec. 4.2)
    num_head_channels: int = -1  # if > 0, channels per attention head instead of --num-heads (the authors' code)
    dropout: float = 0.0  # denoiser dropout (the authors' code)
    seg_channels: int = 64  # segmentation net base width (DRAEM's discriminative net, the authors' code)
    gamma: float = 5.0  # focal-loss weight in L_mask (Eq. 7, Sec. 4.2)
    batch_size: int = 6  # images per step: 3 normal + 3 synthetic (Sec. 4.2)
    lr: float = 1e-4  # Adam learning rate, one optimizer over both networks (Sec. 4.2)
    epochs: int = 500  # training epochs (Sec. 4.2); an epoch (ours) takes each normal image once
    foreground: str = "auto"  # where anomalies are synthesized: auto|mask|object|texture|none (Sec. 3.3)
    texture_dir: str = ""  # anomaly source images such as DTD (Sec. 3.3); empty = self-augmentation only
    eval_t: tuple = (100, 200)  # inference time steps whose maps are averaged (Sec. 4.2, Table 4)
    top_k: int = 50  # image score = mean of the top-K map values (Sec. 3.4)
    seed: int = 0  # seed of the weights, batches, training noise and inference noise


# ----------------------------------------------------------------------------- linear schedule (Eq. 1-2)

def make_schedule(cfg):
    """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) (T,) for t = 0..T-1, alpha_bar_t = prod_{i=0}^{t} (1 - beta_i), as the
    authors' code indexes it (t = 0 is one step of noise); float64, stored as float32."""
    betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.timesteps, dtype=torch.float64)  # Eq. (1)
    alphas_bar = torch.cumprod(1.0 - betas, 0)  # Eq. (2)
    return alphas_bar.sqrt().float(), (1.0 - alphas_bar).sqrt().float()


def extract(a, t):
    """a[t] shaped (B, 1, 1, 1) to broadcast over images."""
    return a.to(t.device)[t].view(-1, 1, 1, 1)


# ------------------------ denoiser eps_theta(x_t, t): the authors' UNetModel module for module (their keys and shapes)

def short_side(cfg):
    return cfg.img_size if isinstance(cfg.img_size, int) else min(cfg.img_size)


def channel_mult(cfg):
    if cfg.channel_mult:
        return tuple(cfg.channel_mult)
    by_size = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4), 32: (1, 2, 3, 4)}  # the authors' code
    if short_side(cfg) not in by_size:
        raise ValueError(f"no default --channel-mult for --img-size {cfg.img_size}; pass one, e.g. 1,2,2,4")
    return by_size[short_side(cfg)]


def norm(ch):
    """GroupNorm with 32 groups (the authors' code); fewer when the width is not a multiple of 32 (small models)."""
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
        q, k, v = qkv.permute(2, 0, 1, 4, 3).contiguous().unbind(0)  # each (B, heads, HW, C/heads), contiguous
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, C/heads)
        return (x + self.proj_out(h.transpose(-1, -2).reshape(B, C, H * W))).reshape(B, C, H, W)


class Stage(nn.Module):
    """One stage of the UNet: its layers in order; the residual blocks also receive the time embedding."""
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
        ch, mult, attn = cfg.base_channels, channel_mult(cfg), set(cfg.attn_resolutions)
        block = lambda cin, cout, how=None: ResBlock(cin, cout, 4 * ch, cfg.dropout, how)
        attention = lambda c: Attention(c, c // cfg.num_head_channels if cfg.num_head_channels > 0 else cfg.num_heads)
        self.time_embedding = nn.Sequential(TimeEmbedding(ch), nn.Linear(ch, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))
        self.down, skips, cur, res = nn.ModuleList([Stage(nn.Conv2d(3, ch, 3, padding=1))]), [ch], ch, short_side(cfg)
        for level, m in enumerate(mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Stage(block(cur, m * ch), *([attention(m * ch)] if res in attn else [])))
                cur = m * ch
                skips.append(cur)
            if level < len(mult) - 1:
                self.down.append(Stage(block(cur, cur, "down")))
                skips.append(cur)
                res //= 2
        mid_attn = [attention(cur)] if attn else []  # none: fully convolutional (ours, for --crop)
        self.middle = Stage(block(cur, cur), *mid_attn, block(cur, cur))
        self.up = nn.ModuleList()
        for level, m in reversed(list(enumerate(mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [block(cur + skips.pop(), m * ch)] + ([attention(m * ch)] if res in attn else [])
                cur = m * ch
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(block(cur, cur, "up"))
                    res *= 2
                self.up.append(Stage(*layers))
        self.out = nn.Sequential(norm(cur), nn.SiLU(), zero(nn.Conv2d(cur, 3, 3, padding=1)))

    def forward(self, x, t):
        emb = self.time_embedding(t)  # (B, 4*base)
        h, hs = x, []
        for stage in self.down:
            h = stage(h, emb)
            hs.append(h)
        h = self.middle(h, emb)
        for stage in self.up:
            h = stage(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


# ----------------------------------------------------------------------------- segmentation sub-network

def conv_bn_relu(cin, cout):
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
        self.enc = nn.ModuleList(nn.Sequential(*conv_bn_relu(in_ch if i == 0 else enc[i - 1], enc[i]),
                                               *conv_bn_relu(enc[i], enc[i])) for i in range(6))
        self.up = nn.ModuleList(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                                              *conv_bn_relu(dec[i + 1], dec[i])) for i in reversed(range(5)))
        self.dec = nn.ModuleList(nn.Sequential(*conv_bn_relu(dec[i] + enc[i], dec[i]), *conv_bn_relu(dec[i], dec[i]))
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


# ----------------------------------------------------------------------------- the method: Eq. 2, 5-8, Alg. 1, Alg. 2

def focal_loss(logits, target, alpha=0.5, focusing=4.0):
    """Binary focal loss from logits, the authors' constants: mean of alpha * (1 - p_t)^4 * -log(p_t)."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")  # -log p_t
    return (alpha * (1.0 - torch.exp(-ce)) ** focusing * ce).mean()


def mask_loss(logits, mask, gamma):
    """Eq. (7): L_mask = SmoothL1(M_hat, M) + gamma * Focal(M_hat, M), M_hat = sigmoid(logits)."""
    return F.smooth_l1_loss(torch.sigmoid(logits), mask) + gamma * focal_loss(logits, mask)


class DiffusionAD(nn.Module):
    """The denoising sub-network, the segmentation sub-network and the schedule. Images in [0, 1], as data.py
    yields them and the authors' code trains. opts: a run's options, read by variants with settings of their own."""
    uses_time_steps = True  # Alg. 2 averages maps over time steps (a variant with one pass has none)

    def __init__(self, cfg, opts=None):
        super().__init__()
        self.cfg = cfg
        self.build(cfg)
        sqrt_ab, sqrt_1mab = make_schedule(cfg)
        self.register_buffer("sqrt_ab", sqrt_ab, persistent=False)  # derived from cfg, not saved
        self.register_buffer("sqrt_1mab", sqrt_1mab, persistent=False)

    def build(self, cfg):
        self.denoiser = DenoisingUNet(cfg)  # eps_theta(x_t, t)
        self.seg = SegmentationUNet(6, cfg.seg_channels)  # on cat(x0, x0_hat)

    def q_sample(self, x0, t, eps):
        return extract(self.sqrt_ab, t) * x0 + extract(self.sqrt_1mab, t) * eps  # Eq. (2)

    def predict_x0(self, x_t, t, eps_hat):
        return (x_t - extract(self.sqrt_1mab, t) * eps_hat) / extract(self.sqrt_ab, t)  # Eq. (5)

    def restore(self, x0, t, eps):
        """Noise-to-norm in one step: x0 (B,3,H,W), t (B,), eps (B,3,H,W) -> x0_hat, clamped to (-1, 1) as the
        authors' predict_x_0_from_eps is (on images in [0, 1], a loose bound: it only stops outliers)."""
        x_t = self.q_sample(x0, t, eps)  # corrupt
        return self.predict_x0(x_t, t, self.denoiser(x_t, t)).clamp(-1, 1)  # Eq. (5)

    def segment(self, x0, x0_hat):
        """Mask logits M (B,1,H,W) from cat(x0, x0_hat)."""
        return self.seg(torch.cat([x0, x0_hat], dim=1))

    def draw(self, x0, mask, clean, label, generator, T):
        """Alg. 1's draws for a batch, as the arguments of forward: t ~ U{0..T-1} and eps ~ N(0, I), a t per image (the
        authors' code; Alg. 1 writes one t). clean (the anomaly-free images) and label serve variants."""
        t = torch.randint(0, T, (len(x0),), generator=generator).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        return x0, mask, t, eps, clean

    def train_loss(self, x0, mask, t, eps):
        """Alg. 1 on one batch: x0 (B,3,H,W) normal and synthetic images, mask (B,1,H,W) their anomaly masks (zero
        for normal ones), t (B,) and eps (B,3,H,W) drawn by the caller. Returns the losses {noise, mask, total}."""
        x_t = self.q_sample(x0, t, eps)  # Alg. 1: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps
        eps_hat = self.denoiser(x_t, t)
        x0_hat = self.predict_x0(x_t, t, eps_hat).clamp(-1, 1)  # Eq. (5)
        loss_noise = F.mse_loss(eps_hat, eps)  # Eq. (6), over every image of the batch
        loss_mask = mask_loss(self.segment(x0, x0_hat), mask, self.cfg.gamma)  # Eq. (7)
        return {"noise": loss_noise, "mask": loss_mask, "total": loss_noise + loss_mask}  # Eq. (8)

    def forward(self, x0, mask, t, eps, clean=None):
        """Calling the model is Alg. 1 (DistributedDataParallel wraps this call); clean, the anomaly-free image
        under each x0, is not read by Alg. 1."""
        return self.train_loss(x0, mask, t, eps)

    def param_groups(self):
        """One Adam over both networks (Sec. 4.2); rates(lr, step): each group's rate."""
        return [{"params": list(self.parameters())}]

    def rates(self, lr, step):
        return [lr]

    def anomaly_map(self, x0, t, eps):
        """Alg. 2 at one time step: (M_t (B,H,W) in float32, x0_hat). The sigmoid runs in float32 (a bf16 one would
        quantise the map)."""
        x0_hat = self.restore(x0, t, eps)
        return torch.sigmoid(self.segment(x0, x0_hat).float())[:, 0], x0_hat

    def anomaly_maps(self, x0, ts, noise):
        """Alg. 2 for a batch x0 (B,3,H,W): one map per time step in ts, averaged; noise (K,3,H,W), one draw per
        time step shared by every image. Returns the maps (B,H,W), the scores (B,), the restorations (K,B,3,H,W)."""
        maps, restored = [], []
        for t, eps in zip(ts, noise):  # Alg. 2: for t in ts
            t = torch.full((len(x0),), t, device=x0.device)
            m, x0_hat = self.anomaly_map(x0, t, eps.expand_as(x0))
            maps.append(m)
            restored.append(x0_hat)
        maps = torch.stack(maps).mean(0)  # Alg. 2: the average over time steps
        return maps, self.image_score(maps), torch.stack(restored)

    def image_score(self, maps):
        """Alg. 2 (Sec. 3.4): an image's score is the mean of its top-K map values. maps (B,H,W) -> (B,)."""
        return maps.flatten(1).topk(min(self.cfg.top_k, maps[0].numel()), dim=1).values.mean(1)


def build_model(cfg, state=None, device="cpu", cls=DiffusionAD, opts=None):
    """A model of class cls (DiffusionAD or a variant) with a checkpoint's weights if given; ValueError when they do
    not fit."""
    model = cls(cfg, opts)
    for name in ("denoiser", "seg"):
        net = getattr(model, name)
        if state is not None and net is not None:
            try:
                net.load_state_dict(state[name])
            except RuntimeError as e:
                raise ValueError(f"checkpoint weights of the {name} do not fit its config: {str(e)[:500]}") from None
    return model.to(device)


# ----------------------------------------------------------------------------- a run's model

# The verbs and run classes in extras/ (they import this file): the one table through which it imports them, late.
ELSEWHERE = {"predict": "extras.predict:main", "export": "extras.export:main", "bench": "extras.bench:main",
             "table": "extras.benchmarks:main", "import-authors": "extras.import_authors:main",
             "preview": "extras.data_verbs:preview", "resize": "extras.data_verbs:resize",
             "seg-only": "extras.ablations:SegmentationAD", "ae": "extras.ablations:DRAEMPlus",
             "denoise-only": "extras.ablations:DenoisingAD", "authors": "extras.authors:NormGuided"}


def elsewhere(name):
    module, attr = ELSEWHERE[name].split(":")
    return getattr(importlib.import_module(module), attr)


def model_class(opts):
    """The class of a run: DiffusionAD, a Table 3 variant (--ablation) or the authors' version (--variant authors)."""
    if opts.variant == "authors":
        return elsewhere("authors")
    return DiffusionAD if opts.ablation == "none" else elsewhere(opts.ablation)


def load(run, cls=None, device="cpu"):
    """(model, cfg) of a run folder or its ckpt.pt in eval mode, as the run's own class or as cls (DiffusionAD...)."""
    path = Path(run) / "ckpt.pt" if Path(run).is_dir() else Path(run)
    state, cfg, opts = load_checkpoint(path, Config)
    return checks.or_exit(build_model, cfg, state, device, cls or model_class(opts), opts).eval(), cfg


# ----------------------------------------------------------------------------- Alg. 1: training

def train_step(forward, optimizer, inputs, opts, device):
    """Eq. (6)-(8) on one batch (forward: the model or its data-parallel wrapper), then one Adam step."""
    with autocast(opts, device):
        loss = forward(*inputs)
    optimizer.zero_grad(set_to_none=True)
    loss["total"].backward()
    optimizer.step()  # Alg. 1: one gradient step on both networks
    return loss


def train(cfg, opts, resume=False, cls=DiffusionAD):
    """Alg. 1 on the normal images of opts.data, then the final evaluation (Alg. 2). extras.run.Run does the
    plumbing: run folder, data, device, resuming, compile and torchrun, the loss log, checkpoints, Ctrl-C."""
    with Run(cfg, opts, resume, Config, getattr(cls, "batch_sampler", data.run_batches)) as run:  # or a variant's
        torch.manual_seed(cfg.seed)  # weights (and dropout)
        model = run.place(checks.or_exit(build_model, cfg, run.state, cls=cls, opts=opts))  # weights when resuming
        optimizer = torch.optim.Adam(model.param_groups(), lr=cfg.lr, fused=run.device.type == "cuda")  # Sec. 4.2
        step, forward = run.start(model, optimizer)  # step > 0 when resuming; forward: compiled/parallel if asked
        T = opts.train_t or cfg.timesteps  # the paper: t ~ U{0..T-1}; --train-t narrows it (extras/options.py)
        model.train()
        for batch in run.batches(step):  # distinct normal images: 3 as they are, 3 made synthetic (Sec. 3.3)
            x0, mask, clean, generator = run.inputs(batch, step)  # on the device (cropped if asked)
            inputs = model.draw(x0, mask, clean, batch["label"], generator, T)  # Alg. 1: t ~ U{0..T-1}, eps ~ N(0, I)
            lr = run.set_lr(optimizer, step, model.rates)  # the paper's constant rate, or our --lr-schedule
            loss = train_step(forward, optimizer, inputs, opts, run.device)
            step += 1
            if run.after_step(step, loss, lr):  # log and checkpoints; True after Ctrl-C or --max-minutes
                break
        run.end()
        final_evaluation(run, model, cfg, opts)
    return run.folder


def final_evaluation(run, model, cfg, opts):
    """After training, on rank 0: the stored threshold (held-out images), model.anomaly_maps on the test split."""
    if run.rank == 0:
        threshold = thresholds.decide(run, lambda images: run_inference(model, images, cfg, opts, run.device)[1],
                                      cfg, opts)
        if threshold is not None:
            run.checkpoint(run.ckpt_path, threshold)
        run.write_metrics({} if run.test is None else evaluate(model, cfg, opts, run.test, run.device,
                                                               opts.test or opts.data, threshold), threshold)


# ----------------------------------------------------------------------------- Alg. 2 over a test split

def evaluate(model, cfg, opts, test, device, name, threshold=None, maps_dir=None):
    """Alg. 2 on a whole test split: metrics (metrics.py), FPS, the reliance on the restoration, its PSNR, the
    threshold's verdicts; panels if maps_dir. Returns the results dict."""
    items, images, masks, labels, has_mask = reports.read_split(test)  # every file read first: reading is not timed
    run_inference(model, images[: opts.eval_batch], cfg, opts, device)  # warm-up (and compilation)
    sync(device)
    t0 = time.perf_counter()
    maps, scores, mse, restored = run_inference(model, images, cfg, opts, device, maps_dir is not None, "test images")
    sync(device)
    fps = len(images) / (time.perf_counter() - t0)
    res = metrics.evaluate(maps, masks, labels, scores, defects=[it["defect"] for it in items], pixel_images=has_mask)
    res.update(fps=round(fps, 3), eval_t=list(cfg.eval_t), data=str(name), device=str(device),
               precision=precision(opts, device))
    if model.denoiser is not None and model.seg is not None:  # the drop with x0_hat := x0
        reports.add_reliance(res, model, images, masks, labels, has_mask, opts, device)
    if model.denoiser is not None:  # PSNR of the restorations (a variant without time steps: its reconstruction)
        res["restoration_psnr_good"] = reports.psnr(mse, labels, cfg.eval_t if model.uses_time_steps else
                                                    ("restoration",))
    reports.report(res, items, scores, threshold, cfg, opts, device)
    if maps_dir is not None:
        reports.save_panels(maps_dir, items, images, restored, maps, cfg.eval_t[0])
    return res


# ----------------------------------------------------------------------------- the command line

def train_cmd(args):
    """train: Alg. 1 on one class, every class of a benchmark root, or data-parallel under torchrun."""
    cfg, opts = options.check_flags(*options.from_flags(args, Config), channel_mult)
    cls = model_class(opts)
    launch(cfg, opts, args.resume, lambda cfg, opts, resume: train(cfg, opts, resume, cls))


def eval_cmd(args):
    """eval: Alg. 2 on a run's test split (or --data / --test), the result in a file of its own."""
    path, state, cfg, opts = open_run(args, Config, channel_mult)
    device = pick_device(opts)
    out, maps_dir = reports.eval_output(args, opts, cfg, path, device)
    test = checks.open_test(args, opts, cfg.img_size)
    model = checks.or_exit(build_model, cfg, state, device, model_class(opts), opts).eval()
    threshold, source = thresholds.stored(state, cfg, opts, path)
    print(f"evaluating {path} (step {state['step']})" + ("" if threshold else f"; no verdicts: {source}"))
    res = evaluate(model, cfg, opts, test, device, args.test or args.data or opts.test or opts.data, threshold,
                   maps_dir if args.save_maps else None)
    res.update(train_seconds=round(state.get("seconds", 0.0), 1), steps=state["step"], checkpoint=str(path))
    reports.write_metrics(out, res, cfg, opts)


def main(argv=None):
    """train and eval (here); predict, export, bench, table, import-authors, preview, resize (ELSEWHERE)."""
    args = cli.parser(Config, __doc__.split("\n\n")[0]).parse_args(argv)
    if torchrun_env()[1] > 1 and args.cmd != "train":
        raise SystemExit(f"{args.cmd} runs in one process: start it without torchrun")
    if args.cmd == "train":
        train_cmd(args)
    elif args.cmd == "eval":
        eval_cmd(args)
    else:
        elsewhere(args.cmd)(args)


if __name__ == "__main__":
    sys.modules.setdefault("diffusionad", sys.modules[__name__])  # `import diffusionad` (extras/...) gets this
    main()                                                          # module, not a second copy of its classes
