"""Alg. 2 over many images, fast: the time steps as one batch (one pass per network), fixed-shape padded batches,
NHWC, bf16 autocast and torch.compile as asked; the noise, one draw per time step from the run's seed. The paper's
Alg. 2 itself is diffusionad.DiffusionAD.anomaly_maps; batched_maps equals it (tests)."""
import torch

import data

from extras.reports import Progress
from extras.speed import autocast, compiled, memory_format


def inference_noise(seed, n_steps, size, device="cpu"):
    """Alg. 2's noise (K,3,S,S): one draw per time step from the seed, the same for every image on every device
    (a score does not depend on its batch; an exported program holds the noise)."""
    return torch.randn((n_steps, 3, *data.hw(size)), generator=torch.Generator().manual_seed(seed)).to(device)


def batched_maps(model, x0, ts, noise):
    """model.anomaly_maps with the K time steps as one batch of K*B images, one pass per network (the speed path
    of run_inference and export; equal to the loop, tests). A variant without time steps runs its own."""
    if not model.uses_time_steps:
        return model.anomaly_maps(x0, ts, noise)
    B, K = x0.shape[0], len(ts)  # shape[0], not len(): torch.export keeps the batch size symbolic
    t = torch.tensor(ts, device=x0.device).repeat_interleave(B)  # (K*B,): row k*B+i is image i at ts[k]
    maps, x0_hat = model.anomaly_map(x0.repeat(K, 1, 1, 1), t, noise.repeat_interleave(B, dim=0))
    maps = maps.view(K, B, *maps.shape[1:]).mean(0)
    return maps, model.image_score(maps), x0_hat.view(K, B, *x0_hat.shape[1:])


def run_inference(model, images, cfg, opts, device, keep_restorations=False, what="images"):
    """Alg. 2 over images (N,3,H,W) in batches of opts.eval_batch (the last one padded: one shape). Returns maps
    (N,H,W), scores (N,), each restoration's squared error (N,K), and those at the first t (N,3,H,W) if asked."""
    ts, B, N = cfg.eval_t, opts.eval_batch, len(images)
    eps = inference_noise(cfg.seed, len(ts), tuple(images.shape[-2:]), device)  # (K,3,H,W): the same for every image
    fmt = memory_format(opts, device, inference=True)
    model.eval().to(memory_format=fmt)
    maps_fn = compiled(model, batched_maps, opts, device)  # torch.compile with --compile
    maps, scores, mse, restored = [], [], [], []
    progress = Progress(N, what, opts.log_every)
    with torch.inference_mode(), autocast(opts, device, inference=True):
        for i in range(0, N, B):
            x0 = images[i: i + B].to(device, non_blocking=True)
            n = len(x0)
            x0 = torch.cat([x0, x0[-1:].expand(B - n, -1, -1, -1)]).contiguous(memory_format=fmt)  # pad to B
            m, s, x0_hat = maps_fn(model, x0, ts, eps)  # Alg. 2
            x0_hat = x0_hat.float()[:, :n].clamp(0, 1)  # (K,n,3,H,W), as an image
            maps.append(m[:n].float().cpu())
            scores.append(s[:n].float().cpu())
            mse.append((x0_hat - x0[:n].float()).pow(2).mean((2, 3, 4)).t().cpu())  # (n,K)
            if keep_restorations:
                restored.append(x0_hat[0].cpu())
            progress.update(i + n)
    return (torch.cat(maps).numpy(), torch.cat(scores).numpy(), torch.cat(mse).numpy(),
            torch.cat(restored) if keep_restorations else None)
