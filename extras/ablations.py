"""Table 3 of the paper (Sec. 4.4): DiffusionAD's sub-networks alone and with DRAEM's autoencoder, each a small
variant of diffusionad.DiffusionAD that overrides what differs (`train --ablation seg-only|ae|denoise-only`).

- SegmentationAD (`seg-only`): the segmentation sub-network alone, on x0 (3 channels); no restoration.
- DRAEM+ (`ae`): DRAEM's reconstructive sub-network in place of the denoiser (no noise, no time step), trained as
  DRAEM trains it, L2 + SSIM against the anomaly-free image; the same segmentation net on cat(x0, x0_hat).
- DenoisingAD (`denoise-only`): the denoising sub-network alone; the map is |x0 - x0_hat| averaged over the
  channels at each time step of Alg. 2. L_noise over the normal images of a batch only: without a segmentation
  net, the synthetic images would teach the denoiser to restore the anomalies.

Sec. 4.4 describes each: the segmentation sub-network alone; an autoencoder in the denoiser's place, close to DRAEM;
the difference between an input and its recovery. What the paper leaves open (DRAEM's autoencoder and its loss, which
images L_noise covers) is ours (README, Deviations). Every variant keeps DiffusionAD's data, batches, optimizer,
checkpoints and evaluation.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from diffusionad import DenoisingUNet, DiffusionAD, SegmentationUNet, conv_bn_relu, mask_loss


class SegmentationAD(DiffusionAD):
    """Table 3: the segmentation sub-network alone, on x0."""
    uses_time_steps = False

    def build(self, cfg):
        self.denoiser, self.seg = None, SegmentationUNet(3, cfg.seg_channels)

    def segment(self, x0, x0_hat):
        return self.seg(x0)

    def train_loss(self, x0, mask, t, eps):
        loss = mask_loss(self.seg(x0), mask, self.cfg.gamma)  # Eq. (7)
        return {"mask": loss, "total": loss}

    def anomaly_maps(self, x0, ts, noise):
        """One pass: there is no restoration and no time step."""
        maps = torch.sigmoid(self.seg(x0).float())[:, 0]
        return maps, self.image_score(maps), x0[None]


class Autoencoder(nn.Module):
    """DRAEM's reconstructive sub-network, no skip connections: 5 encoder levels of two conv-BN-ReLU (w, 2w, 4w, 8w,
    8w), max-pooled between; 4 decoder levels of a bilinear x2 upsampling with conv-BN-ReLU, then two conv-BN-ReLU,
    the second narrowing (8w->4w->2w->w->w); a 3x3 convolution to 3 channels. 69,048,579 parameters at w = 128."""
    def __init__(self, base):
        super().__init__()
        enc = [base * min(2 ** i, 8) for i in range(5)]  # 128, 256, 512, 1024, 1024 at base 128
        wide, narrow = enc[3::-1], enc[2::-1] + [base]  # 1024, 512, 256, 128 -> 512, 256, 128, 128
        self.enc = nn.ModuleList(nn.Sequential(*conv_bn_relu(3 if i == 0 else enc[i - 1], enc[i]), *conv_bn_relu(enc[i], enc[i]))
                                 for i in range(5))
        self.up = nn.ModuleList(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
                                              *conv_bn_relu(w, w)) for w in wide)
        self.dec = nn.ModuleList(nn.Sequential(*conv_bn_relu(w, w), *conv_bn_relu(w, n)) for w, n in zip(wide, narrow))
        self.out = nn.Conv2d(base, 3, 3, padding=1)

    def forward(self, x):
        for i, block in enumerate(self.enc):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
        for up, dec in zip(self.up, self.dec):
            x = dec(up(x))
        return self.out(x)


def ssim_loss(x, y, data_range=1.0):
    """1 - SSIM (Wang et al. 2004) as DRAEM trains its autoencoder with it: an 11x11 Gaussian window (sigma 1.5) per
    channel, zero padding, C1 = (0.01 L)^2, C2 = (0.03 L)^2 for the data range L, the mean over all pixels. L = 1,
    fixed (DRAEM derives it from the reconstruction's values: 1 for images in [0, 1] unless they reach below -0.5)."""
    g = torch.exp(-(torch.arange(11, dtype=x.dtype, device=x.device) - 5) ** 2 / (2 * 1.5 ** 2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2).expand(x.shape[1], 1, 11, 11)
    blur = lambda z: F.conv2d(z, w, padding=5, groups=x.shape[1])
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim = (2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return 1.0 - ssim.mean()


class DRAEMPlus(DiffusionAD):
    """Table 3's DRAEM+: DRAEM's autoencoder restores x0 (model.denoiser holds it, so that checkpoints keep their
    two entries), trained to reconstruct the anomaly-free image (clean) with L2 + SSIM; the same seg net."""
    uses_time_steps = False

    def build(self, cfg):
        self.denoiser, self.seg = Autoencoder(cfg.base_channels), SegmentationUNet(6, cfg.seg_channels)

    def restore(self, x0, t=None, eps=None):
        return self.denoiser(x0).clamp(-1, 1)  # clamped as the denoiser's restoration (DRAEM does not clamp)

    def forward(self, x0, mask, t, eps, clean=None):
        return self.train_loss(x0, mask, t, eps, clean)

    def train_loss(self, x0, mask, t, eps, clean=None):
        """clean: the anomaly-free images (default: x0 itself, as for normal images)."""
        clean = x0 if clean is None else clean
        x0_hat = self.restore(x0)
        loss_rec = F.mse_loss(x0_hat, clean) + ssim_loss(x0_hat, clean)  # DRAEM's reconstruction loss
        loss_mask = mask_loss(self.segment(x0, x0_hat), mask, self.cfg.gamma)  # Eq. (7)
        return {"rec": loss_rec, "mask": loss_mask, "total": loss_rec + loss_mask}

    def anomaly_maps(self, x0, ts, noise):
        """One pass: the reconstruction has no time step."""
        maps, x0_hat = self.anomaly_map(x0, None, None)
        return maps, self.image_score(maps), x0_hat[None]


class DenoisingAD(DiffusionAD):
    """Table 3: the denoising sub-network alone; map = |x0 - x0_hat| averaged over channels, at each time step."""
    def build(self, cfg):
        self.denoiser, self.seg = DenoisingUNet(cfg), None

    def train_loss(self, x0, mask, t, eps):
        eps_hat = self.denoiser(self.q_sample(x0, t, eps), t)
        n = len(x0) // 2  # the normal images come first in every batch (data.step_keys)
        loss = F.mse_loss(eps_hat[:n], eps[:n])  # Eq. (6) over the normal images
        return {"noise": loss, "total": loss}

    def anomaly_map(self, x0, t, eps):
        x0_hat = self.restore(x0, t, eps)
        return (x0 - x0_hat).abs().mean(1).float(), x0_hat

