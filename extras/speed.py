"""Devices and the speed paths around the networks (never inside the paper's lines): the device and its bf16, the
memory layout, autocast, activation checkpointing, torch.compile."""
import functools
import os

import torch

from extras.distributed import data_parallel


def pick_device(opts):
    """auto: CUDA when present (cuda:LOCAL_RANK under torchrun), else the CPU. --amp needs native bf16 (--eval-amp
    falls back to float32 without it)."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {opts.device}: no CUDA device is available")
    if opts.device == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(f"cuda:{local}" if opts.device == "cuda" else opts.device)
    if opts.amp and device.type == "cpu" and not native_bf16(device):
        raise SystemExit("--amp: this CPU has no native bf16 (AMX or AVX512-BF16); bf16 would be emulated and "
                         "slower than float32. Drop --amp")
    if opts.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SystemExit(f"--amp: {torch.cuda.get_device_name(device)} has no bf16 support. Drop --amp")
    return device


def native_bf16(device):
    """Whether bf16 runs natively on the device: a CUDA GPU that supports it, a CPU with AMX or AVX512-BF16."""
    if device.type == "cuda":  # Ampere and later (is_bf16_supported also counts emulation)
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and (torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())


def inference_bf16(opts, device):
    """Whether inference (evaluation, the threshold, predict) runs in bf16: --amp, or --eval-amp (the CPU preset's
    default) where the device has native bf16; float32 elsewhere."""
    return opts.amp or (opts.eval_amp and native_bf16(device))


def precision(opts, device):
    """The inference precision, as metrics.json, the stored threshold and predict say it: bf16 or float32."""
    return "bf16" if inference_bf16(opts, device) else "float32"


def memory_format(opts, device, inference=False):
    """NHWC where it is faster: on CUDA, for bf16 on CPUs (oneDNN's AMX kernels), and for inference on CPUs (fp32:
    1.50x instead of 1.38x the naive loop at the paper's size, docs/RESULTS.md). CPU training in fp32 stays NCHW,
    the layout every CPU result here was trained with (the same numbers, bit for bit)."""
    return torch.channels_last if inference or device.type == "cuda" or opts.amp else torch.contiguous_format


def autocast(opts, device, inference=False):
    """bf16 autocast: training with --amp; inference with --amp or where inference_bf16 says so."""
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=inference_bf16(opts, device) if inference else opts.amp)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def checkpoint_stages(net):
    """Activation checkpointing (torch.utils.checkpoint, non-reentrant) of each stage of a DenoisingUNet (its down,
    middle and up stages) while training with gradients; the forward is replaced in place, state_dict keys stay."""
    from torch.utils.checkpoint import checkpoint
    stages = [*net.down, net.middle, *net.up] if hasattr(net, "middle") else []
    for stage in stages:
        stage.forward = functools.partial(
            lambda plain, x, emb: checkpoint(plain, x, emb, use_reentrant=False)
            if torch.is_grad_enabled() and net.training else plain(x, emb), stage.forward)
    return len(stages)


def compile_networks(model):
    """torch.compile each network's forward in place: state_dict keys stay as they are. (nn.Module.compile() does
    not take effect in every torch release, so the forward is replaced explicitly.)"""
    for net in (model.denoiser, model.seg):
        if net is not None:
            net.forward = torch.compile(net.forward)


def compiled(model, fn, opts, device):
    """fn (called as fn(model, ...)) compiled once per model with --compile (CUDA graphs on a GPU: the inference
    batch shape never changes), else fn itself."""
    if not opts.compile:
        return fn
    if "compiled_maps" not in model.__dict__:
        model.__dict__["compiled_maps"] = torch.compile(fn, mode="reduce-overhead" if device.type == "cuda" else None,
                                                        dynamic=False)
    return model.__dict__["compiled_maps"]


def compile_report():
    c = torch._dynamo.utils.counters
    return (f"torch.compile: {c['stats']['unique_graphs']} graphs compiled, "
            f"{sum(c['graph_break'].values())} graph breaks, {sum(c['recompiles'].values())} recompiles")



def training_forward(model, opts, device, world):
    """The callable that gives Alg. 1's losses: the model, its denoiser's stages checkpointed (--checkpointing), both
    networks compiled (--compile), wrapped for data-parallel training under torchrun."""
    if opts.checkpointing and model.denoiser is not None:
        checkpoint_stages(model.denoiser)
    if opts.compile:
        compile_networks(model)
    return data_parallel(model, device) if world > 1 else model
