"""The authors' released DiffusionAD beside the paper's (`train --variant authors`): their later, norm-guided version
(their models/DDPM.py, train.py, eval.py), a variant of diffusionad.DiffusionAD. The paper's Alg. 1 and 2 are
diffusionad.py's; `eval --alg2` evaluates a run of this variant with them.

- guided_restore: each image noised at a normal t in [0, 300) and at a noisier t in [300, T), two denoiser passes;
  the noisier pass's x0 estimate (clamped) is re-noised to the normal t with the normal pass's predicted noise and
  guides that noise estimate with weight w, then Eq. 5 at the normal t and the clamp.
- variant_train_loss: the segmentation net on cat(x0, guided x0_hat); L_noise = the two per-image MSEs summed,
  averaged over the normal images of the batch (0 when it has none); total = L_noise + L_mask (Eq. 7).
- NormGuided: their training step (forward, draw), their two learning rates (Adam 1e-4 on the denoiser, 1e-5 on the
  seg net on their CosineAnnealingLR(T_max=10) stepped every iteration), their evaluation (anomaly_maps: one guided
  restoration at (200, 400), the seg net's map, the top-50 score).
- authors_batches: each step's images normal or synthetic by a coin (their p = 1/2). Theirs draw every sample with
  torch.randint over all images, with replacement, ignoring the loader's index; ours take each image once per epoch
  (a permutation per epoch), the coin drawn per image and epoch from the seed (resumable).
Ours, not theirs, in this variant (README, Deviations): our synthesizer (data.py) and Alg. 2's fixed noise per step.
"""
import math

import torch

import data
from diffusionad import DiffusionAD, extract, mask_loss


def guided(model, x0, t_normal, t_noisier, eps_normal, eps_noisier, w):
    """(guided x0_hat, the normal pass's noise estimate, the noisier pass's): their norm_guided_one_step_denoising."""
    x_normal, x_noisier = model.q_sample(x0, t_normal, eps_normal), model.q_sample(x0, t_noisier, eps_noisier)
    eps_hat_normal, eps_hat_noisier = model.denoiser(x_normal, t_normal), model.denoiser(x_noisier, t_noisier)
    x0_noisier = model.predict_x0(x_noisier, t_noisier, eps_hat_noisier).clamp(-1, 1)
    x_guide = model.q_sample(x0_noisier, t_normal, eps_hat_normal)  # re-noised to the normal t with its noise estimate
    eps_guided = eps_hat_normal - extract(model.sqrt_1mab, t_normal) * w * (x_guide - x_normal)
    return model.predict_x0(x_normal, t_normal, eps_guided).clamp(-1, 1), eps_hat_normal, eps_hat_noisier


def guided_restore(model, x0, t_normal, t_noisier, eps_normal, eps_noisier, w):
    """The authors' norm-guided one-step restoration of x0 (B,3,H,W) in [0, 1]: t_normal, t_noisier (B,),
    eps_normal, eps_noisier (B,3,H,W), weight w -> x0_hat (B,3,H,W) in (-1, 1), with their clamps. model: any
    DiffusionAD with the denoiser (diffusionad.load(RUN))."""
    return guided(model, x0, t_normal, t_noisier, eps_normal, eps_noisier, w)[0]


def variant_train_loss(model, x0, mask, is_normal, t_normal, t_noisier, eps_normal, eps_noisier, w):
    """Their training step's losses for one batch: x0 (B,3,H,W), mask (B,1,H,W), is_normal (B,) bool, the t's and
    noises of guided_restore. Returns {noise, mask, total}: L_noise = the two per-image MSEs summed, averaged over
    the normal images (0 when there are none); L_mask of the seg net on cat(x0, guided x0_hat) (Eq. 7)."""
    x0_hat, eps_hat_normal, eps_hat_noisier = guided(model, x0, t_normal, t_noisier, eps_normal, eps_noisier, w)
    mse = lambda a, b: (a - b).square().mean((1, 2, 3))  # per image, as their calc_loss
    per_image = mse(eps_hat_normal, eps_normal) + mse(eps_hat_noisier, eps_noisier)
    normal = is_normal.to(per_image.dtype)
    loss_noise = (per_image * normal).sum() / normal.sum().clamp_min(1)  # no host sync: 0 without normal images
    loss_mask = mask_loss(model.segment(x0, x0_hat), mask, model.cfg.gamma)
    return {"noise": loss_noise, "mask": loss_mask, "total": loss_noise + loss_mask}


def authors_batches(n_items, per_batch, seed, start, total, rank=0, world=1):
    """TrainSet keys of the variant's steps: data.epoch_steps, each image of an epoch normal or synthetic (made from
    itself) by a coin drawn from (seed, epoch)."""
    coins = (None, None)
    for epoch, indices in data.epoch_steps(n_items, per_batch, seed, start, total, rank, world):
        if coins[0] != epoch:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch + 50_001)
            coins = (epoch, torch.rand(n_items, generator=g) < 0.5)
        yield [(epoch, i, bool(coins[1][i])) for i in indices]


class NormGuided(DiffusionAD):
    """The authors' released DiffusionAD: the same networks, trained with their step and evaluated as their eval.py.
    opts (RunOptions): guide_t, condition_w, seg_lr, seg_lr_period (their less_t_range, condition_w, seg_lr, T_max)."""
    uses_time_steps = False  # one guided restoration
    batch_sampler = staticmethod(authors_batches)

    def __init__(self, cfg, opts=None):
        super().__init__(cfg)
        self.guide_t, self.w = (opts.guide_t, opts.condition_w) if opts else (300, 1.0)
        self.seg_lr, self.seg_lr_period = (opts.seg_lr, opts.seg_lr_period) if opts else (1e-5, 10)

    def draw(self, x0, mask, clean, label, generator, T):
        """Their draws: per image a normal t ~ U{0..guide_t-1} and a noisier t ~ U{guide_t..T-1}, two noises."""
        B, device = len(x0), x0.device
        t_normal = torch.randint(0, self.guide_t, (B,), generator=generator).to(device)
        t_noisier = torch.randint(self.guide_t, self.cfg.timesteps, (B,), generator=generator).to(device)
        eps_normal, eps_noisier = (torch.randn(x0.shape, generator=generator).to(device) for _ in range(2))
        return x0, mask, (label == 0).to(device), t_normal, t_noisier, eps_normal, eps_noisier

    def forward(self, x0, mask, is_normal, t_normal, t_noisier, eps_normal, eps_noisier):
        return variant_train_loss(self, x0, mask, is_normal, t_normal, t_noisier, eps_normal, eps_noisier, self.w)

    def param_groups(self):
        """Their two Adams as one Adam with two parameter groups (the same updates)."""
        return [{"params": list(self.denoiser.parameters())}, {"params": list(self.seg.parameters())}]

    def rates(self, lr, step):
        """The denoiser's rate (theirs: constant), and the seg net's: their CosineAnnealingLR(T_max, eta_min=0)
        stepped after every iteration, never restarted, a cosine wave of period 2 T_max steps."""
        return [lr, self.seg_lr * (1 + math.cos(math.pi * step / self.seg_lr_period)) / 2]

    def anomaly_maps(self, x0, ts, noise):
        """One guided restoration at ts = (normal t, noisier t) with the noises noise[0], noise[1] (shared by the
        images); the segmentation net's map and its top-K score. Returns maps, scores, x0_hat (1,B,3,H,W)."""
        t_normal, t_noisier = (torch.full((x0.shape[0],), t, device=x0.device) for t in ts)
        x0_hat = guided_restore(self, x0, t_normal, t_noisier, noise[0].expand_as(x0), noise[1].expand_as(x0), self.w)
        maps = torch.sigmoid(self.segment(x0, x0_hat).float())[:, 0]
        return maps, self.image_score(maps), x0_hat[None]
