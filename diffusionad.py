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
    """The method. Every field is a flag (`img_size` -> `--img-size`); defaults are the paper's (Sec. 4.2).
    How a run is done (data, device, run folder...) is runs.RunOptions."""
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
    epochs: int = arg(500, "training epochs, Sec. 4.2")
    max_steps: int = arg(0, "if > 0, train this many steps instead of `epochs` (ours, for CPU budgets)")
    eval_t: str = arg("100,200", "inference time steps whose maps are averaged, Sec. 4.2 / Table 4")
    top_k: int = arg(50, "image score = mean of the top-K map values, Sec. 3.4")
    ablation: str = arg("none", "Table 3: none | seg-only | ae (DRAEM+) | denoise-only")
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
    """Linear betas in float64, stored as float32; index t is the paper's t, with alpha_bar_0 = 1."""
    betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.timesteps, dtype=torch.float64)  # Eq. (1)
    alphas_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1.0 - betas, 0)])
    return alphas_bar.sqrt().float(), (1.0 - alphas_bar).sqrt().float()


def extract(a, t):
    """a[t] shaped (B, 1, 1, 1) to broadcast over images."""
    return a.to(t.device)[t].view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------- denoiser eps_theta(x_t, t)

def channel_mult(cfg):
    if cfg.channel_mult:
        return ints(cfg.channel_mult)
    by_size = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4), 32: (1, 2, 2, 2)}  # authors' code
    if cfg.img_size not in by_size:
        raise ValueError(f"no default --channel-mult for --img-size {cfg.img_size}; pass one, e.g. 1,2,2,4")
    return by_size[cfg.img_size]


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
        for batch in run.batches(step):  # TrainSet items: 3 normal images, 3 synthetic anomalies (Sec. 3.3)
            x0 = to_model(torch.cat([batch["image"], batch["synthetic"]]), cfg)  # normal first, then synthetic
            mask = torch.cat([torch.zeros_like(batch["synthetic_mask"]), batch["synthetic_mask"]])
            x0, mask, g = run.inputs(x0, mask, step)  # on the device, cropped if asked; this step's noise generator
            with runs.autocast(opts, run.device):
                loss = losses(x0, mask, cfg.batch_size // 2, g, step >= cfg.denoiser_warmup)  # Alg. 1: Eq. (6)-(8)
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
        images = torch.stack([run.held_out[i]["image"] for i in range(len(run.held_out))])
        threshold = runs.threshold_summary(run_inference(model, images, cfg, opts, run.device)[1],
                                           opts.threshold_quantile, cfg)
        run.checkpoint(run.ckpt_path, threshold)
        print(f"threshold {threshold['value']:.6f}: the {opts.threshold_quantile} quantile of the scores of "
              f"{len(images)} held-out normal images (median {threshold['held_out_scores']['median']:.6f})")
    if run.test is not None:
        res = evaluate(model, cfg, opts, run.test, run.device, opts.test or opts.data, threshold)
    else:
        print(f"{opts.data}: no test split (a plain folder without --test): the threshold only")
    res.update(threshold=threshold, train_seconds=round(run.train_seconds, 1), steps=run.step)
    runs.write_metrics(run.folder / "metrics.json", res, cfg, opts)
    if opts.compile:
        print("  " + runs.compile_report() + " (training and evaluation)")


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
            out.append(torch.sigmoid(model.segment(x0, x0))[:, 0].float().cpu())
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
    if model.denoiser is not None and model.ablation != "ae" and (labels == 0).any():  # restoration of good images
        psnr = -10 * np.log10(np.maximum(mse[labels == 0], 1e-10)).mean(0)
        res["restoration_psnr_good"] = {str(t): round(float(p), 2) for t, p in zip(ints(cfg.eval_t), psnr)}
    if threshold is not None:
        flag = lambda sel: float((scores[sel] >= threshold["value"]).mean()) if sel.any() else None
        res["flagged"] = {"threshold": threshold["value"], "good": flag(labels == 0), "anomalous": flag(labels == 1)}
    runs.print_metrics(res, cfg, opts, device)
    if maps_dir is not None:
        runs.save_panels(maps_dir, items, images, restored, maps, ints(cfg.eval_t)[0])
    return res


def recalibrate_bn(model, cfg, opts, trainset, device, n_batches):
    """Re-estimate the seg net's BatchNorm statistics on inference-like inputs (ours): training batches,
    normal and synthetic, restored at the inference time steps (training sees t up to T)."""
    import runs
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
    with torch.no_grad(), runs.autocast(opts, device):
        for batch in torch.utils.data.DataLoader(trainset, batch_sampler=batches[:n_batches]):
            x0 = to_model(torch.cat([batch["image"], batch["synthetic"]]), cfg).to(device)
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
    if a.bn_recal:
        recalibrate_bn(model, cfg, opts, runs.make_trainset(cfg, opts), device, a.bn_recal)
    print(f"evaluating {path} (step {state['step']})")
    threshold, source = runs.stored_threshold(state, cfg, path)
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
    else:
        print(runs.write_table(a.folder))


if __name__ == "__main__":
    main()
