"""torchrun: the process group's rank and size, and BatchNorm over the global batch on CPUs too (torch's
SyncBatchNorm is GPU-only). One class trains data-parallel; a benchmark root's classes are spread over the ranks."""
import functools
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


def rank_and_world():
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


def data_parallel(model, device):
    """The model wrapped for data-parallel training: BatchNorm over the global batch in every net that has it (the
    seg net, DRAEM+'s autoencoder), then DistributedDataParallel."""
    for net in (model.denoiser, model.seg):
        if net is not None:
            sync_batch_norm(net)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def in_process_group(fn, opts, *args):
    """fn(*args) inside torchrun's process group (nccl on CUDA, gloo on CPUs), destroyed afterwards."""
    cuda = torch.cuda.is_available() and opts.device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    try:
        return fn(*args)
    finally:
        torch.distributed.destroy_process_group()
