"""Behaviour of diffusionad.py: the equations, the networks, Alg. 1 and 2, checkpoints and the CLI."""
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import diffusionad as D
from extras import ablations, anomalies, checkpoints, options, reports, speed
from extras import run as runs
from extras.inference import batched_maps, inference_noise, run_inference

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(img_size=32, base_channels=16, channel_mult=(1, 2), attn_resolutions=(16,), num_heads=4,
            seg_channels=4, batch_size=6, workers=0, eval_batch=16, log_every=1000.0)


def tiny(**kw):
    """(Config, RunOptions) of a tiny model; kw: fields of either."""
    return options.check_flags(*options.config_and_options({**TINY, **kw}, D.Config), D.channel_mult)


def tiny_cfg(**kw):
    return tiny(**kw)[0]


def tiny_flags(**kw):
    flags = []
    for k, v in {**TINY, **kw}.items():
        flags += [f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
    return flags


def weights(run):
    ck = torch.load(Path(run) / "ckpt.pt", weights_only=True)
    return {f"{n}.{k}": v for n in ("denoiser", "seg") for k, v in ck[n].items()}


# ---------------------------------------------------------------- schedule, Eq. 1, 2, 5

def test_schedule_properties():
    cfg = D.Config()
    sqrt_ab, sqrt_1mab = D.make_schedule(cfg)
    assert sqrt_ab.dtype == torch.float32 and sqrt_ab.shape == (cfg.timesteps,)  # t = 0..T-1
    ab = sqrt_ab.double() ** 2
    assert abs(ab[0] - (1 - 1e-4)) < 1e-7  # alpha_bar_0 = 1 - beta_0: t = 0 is one step of noise
    assert torch.all(ab[1:] < ab[:-1])  # strictly decreasing
    assert torch.allclose(sqrt_ab ** 2 + sqrt_1mab ** 2, torch.ones_like(sqrt_ab), atol=1e-6)
    betas = 1 - torch.cat([ab[:1], ab[1:] / ab[:-1]])
    betas[0] = 1 - ab[0]
    assert torch.allclose(betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), atol=1e-6)
    # the authors' values (np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[t]): Alg. 2's t = 100 and 200 are theirs
    assert abs(ab[100] - 0.8951415908975365) < 1e-6 and abs(ab[200] - 0.6563470055193468) < 1e-6
    assert abs(ab[999] - 4.035829765375676e-05) < 1e-8


def test_eq2_eq5_round_trip_with_true_noise():
    model = D.DiffusionAD(tiny_cfg())
    x0 = torch.rand(4, 3, 32, 32)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 100, 500, 999])
    x_t = model.q_sample(x0, t, eps)
    assert torch.allclose(model.predict_x0(x_t, t, eps), x0, atol=2e-3)  # t = 999 amplifies float error
    assert torch.allclose(model.predict_x0(x_t, t, eps)[:3], x0[:3], atol=1e-5)


@pytest.mark.parametrize("size,mult", [(32, (1, 2)), (64, (1, 2, 2)), (128, (1, 1, 2, 2))])
def test_network_output_shapes(size, mult):
    cfg = tiny_cfg(img_size=size, channel_mult=mult, attn_resolutions=(16, 8))
    model = D.DiffusionAD(cfg)
    x = torch.rand(2, 3, size, size)
    assert model.denoiser(x, torch.tensor([0, 999])).shape == (2, 3, size, size)
    assert model.seg(torch.cat([x, x], 1)).shape == (2, 1, size, size)


def test_the_cpu_preset_takes_its_size_and_anomalies_from_the_images(tmp_path, capsys):
    both = lambda *flags: options.from_flags(argparse_train(list(flags)), D.Config)
    cfg, opts = both("--preset", "cpu")  # the built-in set: 64 px
    assert (cfg.img_size, opts.crop, cfg.channel_mult, cfg.attn_resolutions) == (64, 64, (1, 2, 4), ())
    assert (opts.lr_schedule, opts.train_t, opts.max_steps, opts.anomaly_shape) == ("cosine", 300, 3000, "mixed")
    assert both()[1].lr_schedule == "constant" and both()[0].img_size == 256  # the paper's
    rng = np.random.default_rng(0)
    for name, size, binary in (("grey", 600, False), ("board", 400, True), ("small", 100, False)):
        for i in range(5):
            a = rng.random((size, size)) * 0.6 + 0.2
            a = (a > 0.5) if binary else a
            Image.fromarray((a * 255).astype(np.uint8)).save((tmp_path / name).mkdir(exist_ok=True) or
                                                            tmp_path / name / f"{i}.png")
    grey, board = both("--preset", "cpu", "--data", str(tmp_path / "grey")), both("--preset", "cpu", "--data",
                                                                                  str(tmp_path / "board"))
    assert grey[0].img_size == 256 and (grey[1].anomaly_shape, grey[1].anomaly_fill) == ("mixed", "blend")
    assert board[0].img_size == 256 and board[0].eval_t == (200, 400) and board[1].train_t == 600  # binarised
    assert (board[1].anomaly_shape, board[1].anomaly_fill, board[0].foreground) == ("small", "invert", "none")
    assert both("--preset", "cpu", "--data", str(tmp_path / "small"))[0].img_size == 96  # 100 -> a multiple of 32
    assert both("--preset", "cpu", "--data", str(tmp_path / "grey"), "--crop", "32", "--lr-schedule", "constant")[1] \
        .crop == 32  # your flags win
    assert "binarised images: small defects, fill invert, t up to 600, inference at 200, 400" in capsys.readouterr().out
    for c in ("b1", "b2"):  # a benchmark root in MVTec's layout: its classes' images together
        (tmp_path / "root" / c / "test").mkdir(parents=True)
        (tmp_path / "root" / c / "train" / "good").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(((rng.random((400, 400)) > 0.5) * 255).astype(np.uint8)).save(
                tmp_path / "root" / c / "train" / "good" / f"{i}.png")
    root = both("--preset", "cpu", "--data", str(tmp_path / "root"), "--img-size", "128")
    assert root[0].img_size == 128 and root[1].anomaly_fill == "invert"
    assert "--preset cpu: images at 128 px (their median short side 400" in capsys.readouterr().out  # as used


def test_the_cpu_preset_infers_in_bf16_only_where_the_device_has_it_and_no_amp_turns_it_off(monkeypatch, capsys):
    both = lambda *flags: options.from_flags(argparse_train(list(flags)), D.Config)[1]
    cpu, run = torch.device("cpu"), options.RunOptions(device="cpu")
    assert both("--preset", "cpu").eval_amp and not both("--preset", "cpu").amp and not both().eval_amp
    assert not both("--preset", "cpu", "--no-amp").eval_amp and both("--preset", "cpu", "--amp").amp
    assert both("--preset", "cpu", "--no-amp", "--eval-amp").eval_amp  # the flag itself wins
    for native in (True, False):
        monkeypatch.setattr(speed, "native_bf16", lambda device: native)
        capsys.readouterr()
        preset = both("--preset", "cpu", "--device", "cpu")
        assert ("inference in bf16 (native on this device; --no-amp: float32)" in capsys.readouterr().out) == native
        assert speed.inference_bf16(preset, cpu) == native and not speed.inference_bf16(run, cpu)
        with speed.autocast(preset, cpu, inference=True):
            assert torch.is_autocast_enabled("cpu") == native
        with speed.autocast(preset, cpu):  # training: float32 unless --amp
            assert not torch.is_autocast_enabled("cpu")


def argparse_train(flags):
    import argparse
    p = argparse.ArgumentParser()
    options.add_flags(p, D.Config)
    return p.parse_args(flags)


def test_empty_attention_list_gives_a_fully_convolutional_denoiser():
    net = D.DenoisingUNet(tiny_cfg(attn_resolutions=()))
    assert not any(isinstance(m, D.Attention) for m in net.modules())
    assert net(torch.rand(1, 3, 64, 64), torch.tensor([5])).shape == (1, 3, 64, 64)  # any size: convolutional
    assert sum(isinstance(m, D.Attention) for m in D.DenoisingUNet(tiny_cfg()).modules()) > 1


def test_paper_size_builds_with_default_multipliers():
    cfg = options.check_flags(D.Config(img_size=256, base_channels=32, seg_channels=4), options.RunOptions(), D.channel_mult)[0]
    assert D.channel_mult(cfg) == (1, 1, 2, 2, 4, 4)
    assert D.DenoisingUNet(cfg)(torch.rand(1, 3, 256, 256), torch.tensor([5])).shape == (1, 3, 256, 256)
    by_size = {s: D.channel_mult(D.Config(img_size=s)) for s in (32, 64, 128)}
    assert by_size == {32: (1, 2, 3, 4), 64: (1, 2, 3, 4), 128: (1, 1, 2, 3, 4)}  # the authors' UNetModel


# ---------------------------------------------------------------- Alg. 1

def fixed_batch(source=False):
    """3 normal + 3 synthetic images (a patch inverted) and their masks; source=True: also the images before."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 32, 32, generator=g)
    clean = x0.clone()
    mask = torch.zeros(6, 1, 32, 32)
    mask[3:, :, 8:16, 8:16] = 1
    x0[3:, :, 8:16, 8:16] = 1 - x0[3:, :, 8:16, 8:16]
    return (x0, mask, clean) if source else (x0, mask)


def draws(x0, seed=0, T=1000):
    """Alg. 1's t and eps for a batch, as the training loop draws them."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, T, (len(x0),), generator=g), torch.randn(x0.shape, generator=g)


def test_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = D.DiffusionAD(tiny_cfg(num_res_blocks=1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x0, mask = fixed_batch()
    losses = []
    for _ in range(15):
        loss = model.train_loss(x0, mask, *draws(x0, 1))["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_mask_loss_gradient_reaches_the_denoiser():
    model = D.DiffusionAD(tiny_cfg())
    x0, mask = fixed_batch()
    out = model.train_loss(x0, mask, *draws(x0))
    assert set(out) == {"noise", "mask", "total"} and out["total"].item() == (out["noise"] + out["mask"]).item()
    out["mask"].backward()
    grads = [p.grad for p in model.denoiser.parameters()]
    assert all(g is not None for g in grads)
    assert sum(g.abs().sum().item() for g in grads) > 0


def test_noise_loss_is_averaged_over_every_image_of_the_batch():
    """Eq. (6) has no restriction to normal images: L_noise is the mean over the whole batch, the mean of the
    per-image MSEs as the authors' calc_loss computes them (DenoisingAD alone keeps the normal half)."""
    model, den = D.DiffusionAD(tiny_cfg()), ablations.DenoisingAD(tiny_cfg())
    for net in (model.denoiser, den.denoiser):
        torch.nn.init.normal_(net.out[2].weight, std=0.1)  # zero-initialised: eps_hat would not depend on x0
    x0, mask = fixed_batch()
    t, eps = draws(x0)
    a = model.train_loss(x0, mask, t, eps)["noise"]
    with torch.no_grad():
        per_image = (model.denoiser(model.q_sample(x0, t, eps), t) - eps).square().mean((1, 2, 3))
    assert torch.allclose(a, per_image.mean(), rtol=1e-6) and not torch.allclose(a, per_image[:3].mean(), rtol=1e-3)
    x0[3:] = torch.rand(3, 3, 32, 32)  # the synthetic half moves it
    assert model.train_loss(x0, mask, t, eps)["noise"].item() != a.item()
    b = den.train_loss(x0, mask, t, eps)["noise"]
    x0[3:] = torch.rand(3, 3, 32, 32)
    assert den.train_loss(x0, mask, t, eps)["noise"].item() == b.item()


# ---------------------------------------------------------------- Alg. 2

def test_alg2_is_a_loop_over_time_steps_and_the_batched_path_equals_it():
    model = D.DiffusionAD(tiny_cfg()).eval()
    x0 = torch.rand(3, 3, 32, 32)
    noise = torch.randn(2, 3, 32, 32)  # one draw per time step, shared by the images
    with torch.inference_mode():
        maps, scores, rec = model.anomaly_maps(x0, (100, 200), noise)
        m1, x1 = model.anomaly_map(x0, torch.full((3,), 100), noise[0].expand(3, -1, -1, -1))
        m2, x2 = model.anomaly_map(x0, torch.full((3,), 200), noise[1].expand(3, -1, -1, -1))
        fast = batched_maps(model, x0, (100, 200), noise)
    assert torch.equal(maps, (m1 + m2) / 2) and torch.equal(rec, torch.stack([x1, x2]))
    top = ((m1 + m2) / 2).flatten(1).topk(50, dim=1).values.mean(1)
    assert torch.allclose(scores, top, atol=1e-6)
    assert torch.allclose(fast[0], maps, atol=1e-5) and torch.allclose(fast[1], scores, atol=1e-5)
    assert fast[2].shape == (2, 3, 3, 32, 32) and torch.allclose(fast[2], rec, atol=1e-5)
    assert not torch.allclose(m1, m2)  # the time steps differ: a wrong pairing of t and noise would show


def test_restoration_is_clamped_to_minus_one_one_as_the_authors():
    model = D.DiffusionAD(tiny_cfg())
    x0 = torch.rand(2, 3, 32, 32)  # images in [0, 1], x0_hat in (-1, 1): the authors' predict_x_0_from_eps
    x0_hat = model.restore(x0, torch.tensor([999, 999]), torch.randn(2, 3, 32, 32))
    assert x0_hat.min() == -1.0 and x0_hat.max() == 1.0  # t = T divides by sqrt(alpha_bar) ~ 0.006: clamped


def test_train_t_limits_the_sampled_time_steps(monkeypatch, tmp_path, parts):
    drawn = {}
    for train_t in (300, 2):
        seen = []
        monkeypatch.setattr(D.DiffusionAD, "train_loss", lambda self, x0, mask, t, eps: (
            seen.append(t), {"noise": eps.mean() * 0, "total": (self.denoiser(x0, t) * 0).sum()})[1])
        D.train(*tiny(data=str(parts), max_steps=10, train_t=train_t, holdout=0, out=str(tmp_path / str(train_t))))
        drawn[train_t] = torch.cat(seen)
    assert drawn[300].min() >= 0 and drawn[300].max() <= 299 and drawn[300].max() > 200  # t ~ U{0..299}
    assert set(drawn[2].tolist()) == {0, 1}  # 0-based: t = 0 is drawn, t = train_t never
    with pytest.raises(SystemExit, match="--train-t"):
        tiny(train_t=1001)
    with pytest.raises(SystemExit, match=r"--eval-t needs time steps in \[0, 999\]"):
        tiny(eval_t=(100, 1000))


def test_random_crops_keep_the_anomaly():
    x0 = torch.arange(2 * 3 * 64 * 64, dtype=torch.float32).view(2, 3, 64, 64)
    mask = torch.zeros(2, 1, 64, 64)
    mask[1, 0, 60:63, 2:5] = 1  # a small anomaly in a corner of the synthetic image
    for seed in range(20):
        xc, mc = anomalies.random_crops(x0, mask, 32, torch.Generator().manual_seed(seed))
        assert xc.shape == (2, 3, 32, 32) and mc.shape == (2, 1, 32, 32)
        assert mc[0].sum() == 0 and mc[1].sum() > 0
        top, left = divmod(int(xc[1, 0, 0, 0]) - 3 * 64 * 64, 64)  # the window's corner, from the pixel ids
        assert torch.equal(xc[1], x0[1, :, top:top + 32, left:left + 32])
        assert torch.equal(mc[1], mask[1, :, top:top + 32, left:left + 32])
    with pytest.raises(SystemExit, match="--crop"):
        tiny(crop=48)


@pytest.mark.parametrize("ablation", ["seg-only", "ae", "denoise-only"])
def test_ablations_train_and_infer(ablation):
    cfg, opts = tiny(ablation=ablation)
    model = D.build_model(cfg, cls=D.model_class(opts), opts=opts)
    assert type(model) is D.model_class(opts) and type(model) is not D.DiffusionAD
    x0, mask, clean = fixed_batch(source=True)
    out = model(x0, mask, *draws(x0), clean)
    out["total"].backward()
    assert torch.isfinite(model.train_loss(x0, mask, *draws(x0))["total"])  # the CPU note's probe calls it so
    assert set(out) == {"seg-only": {"mask", "total"}, "ae": {"rec", "mask", "total"},
                        "denoise-only": {"noise", "total"}}[ablation]
    with torch.inference_mode():
        maps, scores, _ = model.eval().anomaly_maps(x0, (100, 200), torch.randn(2, 3, 32, 32))
        fast = batched_maps(model, x0, (100, 200), torch.randn(2, 3, 32, 32))
    assert maps.shape == (6, 32, 32) and scores.shape == (6,) and fast[0].shape == (6, 32, 32)
    assert model.uses_time_steps == (ablation == "denoise-only")


# ---------------------------------------------------------------- runs, checkpoints, resume

# Bitwise reproducibility is promised on the CPU; on CUDA, cuDNN and atomic adds differ in the last bits.
def test_same_seed_same_run_and_checkpoint_loads_weights_only(tmp_path, parts):
    folders = [D.train(*tiny(data=str(parts), holdout=0, max_steps=3, device="cpu", out=str(tmp_path / n))) for n in "ab"]
    wa, wb = weights(folders[0]), weights(folders[1])
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la = (folders[0] / "log.csv").read_text().splitlines()
    lb = (folders[1] / "log.csv").read_text().splitlines()
    assert len(la) == 4 and [r.split(",")[1:5] for r in la] == [r.split(",")[1:5] for r in lb]
    ck = torch.load(folders[0] / "ckpt.pt", weights_only=True)
    assert ck["step"] == 3 and ck["config"]["max_steps"] == 3 and "optimizer" in ck
    model, cfg = D.load(folders[0])  # the documented way to a run's model
    assert torch.equal(model.denoiser.state_dict()["down.0.0.weight"], ck["denoiser"]["down.0.0.weight"])
    assert cfg == tiny()[0] and not model.training and type(model) is D.DiffusionAD
    assert torch.equal(D.load(folders[0] / "ckpt.pt")[0].seg.out.weight, model.seg.out.weight)
    c = D.train(*tiny(data=str(parts), holdout=0, max_steps=3, seed=1, device="cpu", out=str(tmp_path / "c")))
    assert not torch.equal(weights(c)["denoiser.down.0.0.weight"], wa["denoiser.down.0.0.weight"])


def test_resume_continues_the_same_trajectory(tmp_path, parts):
    full = D.train(*tiny(data=str(parts), holdout=0, max_steps=5, device="cpu", out=str(tmp_path / "full")))
    part = tiny(data=str(parts), holdout=0, max_steps=3, device="cpu", out=str(tmp_path / "part"))
    D.train(*part)
    D.train(part[0], replace(part[1], max_steps=5), resume=True)
    wf, wp = weights(full), weights(tmp_path / "part")
    assert all(torch.allclose(wf[k], wp[k], atol=1e-6) for k in wf)
    steps = [r.split(",")[0] for r in (tmp_path / "part" / "log.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4", "5"]


def test_cosine_schedule_decays_to_zero_and_constant_is_the_papers():
    lrs = [runs.lr_at(s, 1e-3, "cosine", 100) for s in range(100)]
    assert lrs[0] == 1e-3 and lrs[50] == pytest.approx(5e-4) and 0 < lrs[-1] < 1e-6
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert runs.lr_at(99, 1e-3, "constant", 100) == 1e-3


@pytest.mark.parametrize("schedule,variant", [("constant", "paper"), ("cosine", "paper"), ("constant", "authors")])
def test_a_run_ended_by_max_minutes_resumes_exactly(tmp_path, schedule, variant, parts):
    flags = tiny_flags(data=str(parts), holdout=0, ckpt_every=3, lr_schedule=schedule, variant=variant, batch_size=6)
    D.main(["train", *flags, "--max-steps", "6", "--out", str(tmp_path / "a")])
    D.main(["train", *flags, "--max-steps", "6", "--max-minutes", "1e-9", "--out", str(tmp_path / "b")])
    D.main(["train", *flags, "--max-steps", "6", "--out", str(tmp_path / "b"), "--resume"])
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in "ab")
    for k in a["denoiser"]:
        assert torch.equal(a["denoiser"][k], b["denoiser"][k]), k
    logged = [r.split(",")[5] for r in (tmp_path / "b" / "log.csv").read_text().splitlines()[1:]]
    assert logged == [f"{runs.lr_at(s, 1e-4, schedule, 6):.6g}" for s in range(6)]


def test_max_minutes_ends_with_a_checkpoint_and_the_final_evaluation(tmp_path, capsys):
    run = D.train(*tiny(data="synthetic", max_steps=50, max_minutes=1e-6, out=str(tmp_path / "m")))
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == 1
    assert json.loads((run / "metrics.json").read_text())["steps"] == 1
    assert "--max-minutes 1e-06 reached at step 1/50" in capsys.readouterr().out


def test_resume_errors(tmp_path, parts):
    quick = lambda **kw: tiny(data=str(parts), holdout=0, **kw)
    with pytest.raises(SystemExit, match="--resume: no checkpoint"):
        D.train(*quick(max_steps=1, out=str(tmp_path / "none")), resume=True)
    D.train(*quick(max_steps=1, out=str(tmp_path / "r")))
    with pytest.raises(SystemExit, match=r"another configuration:\n  base_channels: checkpoint 16 vs requested 32"):
        D.train(*quick(max_steps=2, base_channels=32, out=str(tmp_path / "r")), resume=True)
    with pytest.raises(SystemExit, match=r"lr: checkpoint 0.0001 vs requested 0.001"):
        D.train(*quick(max_steps=2, lr=1e-3, out=str(tmp_path / "r")), resume=True)
    with pytest.raises(SystemExit, match=r"train_t: checkpoint 0 vs requested 300"):  # a recipe option is fixed too
        D.train(*quick(max_steps=2, train_t=300, out=str(tmp_path / "r")), resume=True)
    with pytest.raises(SystemExit, match="--variant authors draws its time steps by --guide-t: drop --train-t"):
        tiny(variant="authors", train_t=300)
    with pytest.raises(SystemExit, match="exists: pass --resume"):
        D.train(*quick(max_steps=2, out=str(tmp_path / "r")))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, parts):
    real = D.DiffusionAD.train_loss

    def poisoned(self, *a):
        out = real(self, *a)
        if len(steps) == 3:
            out["total"] = out["total"] * float("nan")
        steps.append(1)
        return out
    steps = []
    monkeypatch.setattr(D.DiffusionAD, "train_loss", poisoned)
    with pytest.raises(SystemExit, match=r"loss is nan at step 4.*checkpoint \(step 2\)"):
        D.train(*tiny(data=str(parts), holdout=0, max_steps=10, ckpt_every=2, out=str(tmp_path / "n")))
    assert torch.load(tmp_path / "n" / "ckpt.pt", weights_only=True)["step"] == 2


def test_out_of_memory_gives_advice(tmp_path, monkeypatch, parts):
    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(D.DiffusionAD, "train_loss", oom)
    with pytest.raises(SystemExit, match="smaller --batch-size, --amp"):
        D.train(*tiny(data=str(parts), holdout=0, max_steps=2, out=str(tmp_path / "o")))


def test_bad_config_and_flags():
    with pytest.raises(SystemExit, match="--batch-size must be even"):
        tiny(batch_size=5)
    with pytest.raises(SystemExit, match="--ablation must be one of"):
        tiny(ablation="vae")
    with pytest.raises(SystemExit, match="--lr-schedule must be one of constant, cosine"):
        tiny(lr_schedule="step")
    with pytest.raises(SystemExit, match="--base-channels 16 must be divisible by --num-head-channels 12"):
        tiny(num_head_channels=12)
    with pytest.raises(SystemExit):  # argparse: unknown flag
        D.main(["train", "--no-such-flag", "1"])
    with pytest.raises(SystemExit):  # no abbreviations either
        D.main(["train", "--base", "64"])


def test_a_value_that_is_not_a_number_and_a_bench_of_nothing_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        D.main(["train", "--eval-t", "1o0"])
    assert e.value.code == 2 and "argument --eval-t: must be comma-separated integers, got '1o0'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="bench: --train-steps and --n-images must be >= 1, got 0 and 8"):
        D.main(["bench", "--train-steps", "0"])


def test_checkpoint_of_another_kind_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(SystemExit, match="not a DiffusionAD checkpoint"):
        checkpoints.load_checkpoint(bad, D.Config)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="junk.pt: not a readable"):
        checkpoints.load_checkpoint(tmp_path / "junk.pt", D.Config)
    model = D.DiffusionAD(tiny_cfg())
    checkpoints.save_checkpoint(tmp_path / "new.pt", model, torch.optim.Adam(model.parameters()), 0, *tiny())
    assert checkpoints.load_checkpoint(tmp_path / "new.pt", D.Config)[1:] == tiny()
    state = torch.load(tmp_path / "new.pt", weights_only=True)
    strings = {k: ",".join(map(str, v)) for k, v in state["config"].items() if isinstance(v, tuple)}
    torch.save({**state, "config": {**state["config"], **strings}}, tmp_path / "strings.pt")  # "100,200" as written
    assert checkpoints.load_checkpoint(tmp_path / "strings.pt", D.Config)[1:] == tiny()  # by the format's first runs
    for version in (2, None):  # L_noise over the normal half; other networks and 1-based t
        torch.save({**{k: v for k, v in state.items() if k != "version"}, **({"version": version} if version else {})},
                   tmp_path / "old.pt")
        with pytest.raises(SystemExit, match=f"old.pt: checkpoint format {version or 1}, written by another version"):
            checkpoints.load_checkpoint(tmp_path / "old.pt", D.Config)
    torch.save({"unet_model_state_dict": {}, "seg_model_state_dict": {}, "args": {}}, tmp_path / "theirs.pt")
    with pytest.raises(SystemExit, match="a checkpoint of the authors' train.py; convert it first: .* import-authors"):
        checkpoints.load_checkpoint(tmp_path / "theirs.pt", D.Config)


# ---------------------------------------------------------------- the CLI end to end

def make_mvtec_tree(root, n_train=12, size=40, name="toy"):
    rng = np.random.default_rng(0)
    cls = root / name
    for sub in ("train/good", "test/good", "test/hole", "ground_truth/hole"):
        (cls / sub).mkdir(parents=True)
    def img():
        return (rng.random((size, size, 3)) * 60 + 100).astype(np.uint8)
    for i in range(n_train):
        Image.fromarray(img()).save(cls / f"train/good/{i:03d}.png")
    for i in range(3):
        Image.fromarray(img()).save(cls / f"test/good/{i:03d}.png")
        a, m = img(), np.zeros((size, size), np.uint8)
        a[10:20, 10:20] = 0
        m[10:20, 10:20] = 255
        Image.fromarray(a).save(cls / f"test/hole/{i:03d}.png")
        Image.fromarray(m).save(cls / f"ground_truth/hole/{i:03d}_mask.png")
    return cls


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(class folder, run folder): a tiny model trained through the CLI on an MVTec-layout class on 32-px crops of
    64-px images, evaluated whole; shared by the tests that evaluate, predict and diagnose a trained run."""
    root = tmp_path_factory.mktemp("toy")
    cls, run = make_mvtec_tree(root), root / "run"
    D.main(["train", "--data", str(cls), "--out", str(run), "--max-steps", "4", "--ckpt-every", "2", "--crop", "32"]
           + tiny_flags(img_size=64))
    return cls, run


def test_cli_train_eval_predict(toy, tmp_path, capsys):
    cls, run = toy
    for f in ("config.json", "log.csv", "ckpt.pt", "metrics.json"):
        assert (run / f).is_file(), f
    m = json.loads((run / "metrics.json").read_text())
    for k in ("image_auroc", "pixel_auroc", "pixel_pro", "pixel_ap", "fps", "n_test_good", "n_test_anomalous",
              "train_seconds", "config"):
        assert k in m, k
    assert m["n_test_good"] == 3 and m["n_test_anomalous"] == 3
    assert all(0 <= m[k] <= 1 for k in ("image_auroc", "pixel_auroc", "pixel_pro", "pixel_ap"))
    assert json.loads((run / "config.json").read_text())["base_channels"] == 16

    D.main(["eval", "--run", str(run), "--eval-t", "100", "--save-maps", "--json", str(tmp_path / "m100.json")])
    out = capsys.readouterr().out
    assert "Image AUROC" in out and "file reading excluded" in out
    assert json.loads((tmp_path / "m100.json").read_text())["eval_t"] == [100]
    assert json.loads((run / "config.json").read_text())["eval_t"] == [100, 200]
    panels = sorted((run / "eval_ckpt_toy_t100").glob("*.png"))  # named after what was evaluated
    assert len(panels) == 6 and Image.open(panels[0]).size == (4 * 64, 64)  # trained on crops, evaluated whole

    csv_path = tmp_path / "scores.csv"
    D.main(["predict", "--ckpt", str(run / "ckpt.pt"), str(cls / "test" / "hole"), str(cls / "test/good/000.png"),
            "--csv", str(csv_path), "--out", str(tmp_path / "pred")])
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "path,score,anomalous,heatmap" and len(rows) == 5
    assert all(0 <= float(r.split(",")[1]) <= 1 for r in rows[1:])
    assert len(list((tmp_path / "pred").glob("*_map.png"))) == 4
    with pytest.raises(SystemExit, match="no such file"):
        D.main(["predict", "--ckpt", str(run / "ckpt.pt"), str(tmp_path / "missing.png")])


def native_bf16():
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def test_bench_runs_and_reports_both_paths(capsys):
    D.main(["bench", "--n-images", "2", "--train-size", "32", "--train-steps", "1", "--workers", "1"]
           + tiny_flags(workers=1) + (["--amp"] if native_bf16() else []))
    out = capsys.readouterr().out
    assert "training step, 32x32, batch 6" in out and out.count("samples/s") == 2
    assert "plain (fp32, NCHW, .item() per step)" in out and "shipped (" in out and "no per-step sync" in out
    assert "data loader alone (synthetic, 1 workers, synthesizer included)" in out
    assert "naive (1 image" in out and "shipped (batch 16" in out
    assert ("shipped with bf16" in out) == native_bf16()


def test_cuda_without_a_gpu_and_eval_under_torchrun_are_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: no CUDA device is available"):
        speed.pick_device(tiny(device="cuda")[1])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="eval runs in one process: start it without torchrun"):
        D.main(["eval", "--run", "nowhere"])


def test_amp_on_a_cpu_without_native_bf16_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    with pytest.raises(SystemExit, match="--amp: this CPU has no native bf16"):
        speed.pick_device(tiny(amp=True, device="cpu")[1])
    assert speed.pick_device(tiny(device="cpu")[1]).type == "cpu"


# ---------------------------------------------------------------- what happens when... (README table)

def test_broken_files_are_all_reported_before_training(tmp_path, capsys):
    cls = make_mvtec_tree(tmp_path)
    (cls / "train/good/003.png").write_bytes(b"\x89PNG not really")                    # corrupt
    good = (cls / "train/good/004.png").read_bytes()
    (cls / "train/good/004.png").write_bytes(good[:-60])                               # truncated
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(cls / "ground_truth/hole/001_mask.png")  # wrong size
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        D.main(["train", "--data", str(cls), "--out", str(run), "--max-steps", "2"] + tiny_flags(img_size=64))
    msg = str(e.value.code)
    assert msg.startswith(f"{cls}: 3 problem(s) found before training")
    assert "003.png: not a readable image" in msg and "004.png: truncated PNG" in msg and "mask is 20x20" in msg
    assert not run.exists()                                                             # before any work
    (cls / "ground_truth/hole/002_mask.png").unlink()                                  # a missing mask
    with pytest.raises(SystemExit, match=r"(?s)problem.*002.png has no mask"):
        D.main(["train", "--data", str(cls), "--out", str(run), "--max-steps", "2"] + tiny_flags(img_size=64))


@pytest.mark.parametrize("flags,message", [
    (["--max-steps", "-5", "--epochs", "0"], r"--epochs must be >= 1, got 0\n  --max-steps must be >= 0, got -5"),
    (["--lr", "0", "--eval-t", "1000"], r"--lr must be > 0, got 0.0\n  --eval-t needs time steps in \[0, 999\]"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--data", "/no/such/folder"], "dataset folder /no/such/folder does not exist"),
    (["--lr", "0"], "--lr must be > 0"),
])
def test_bad_flags_and_paths_are_one_clear_message(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        D.main(["train", *tiny_flags(), "--out", str(tmp_path / "r"), *flags])
    assert not (tmp_path / "r").exists()


def test_cli_errors_print_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "diffusionad.py", "train", "--data", str(tmp_path / "nope")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"class folder {tmp_path / 'nope'} does not exist; {tmp_path} contains no folders"


def test_unwritable_run_folder(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="cannot write the run folder.*pass a writable --out"):
        D.train(*tiny(data="synthetic", max_steps=1, out=str(tmp_path / "file" / "run")))


def test_nan_at_the_first_step_says_no_checkpoint_exists(tmp_path, monkeypatch, parts):
    real = D.DiffusionAD.train_loss
    monkeypatch.setattr(D.DiffusionAD, "train_loss", lambda self, *a: {k: v * float("nan") for k, v in real(self, *a).items()})
    with pytest.raises(SystemExit, match=r"loss is nan at step 1; stopped, no checkpoint was written yet"):
        D.train(*tiny(data=str(parts), holdout=0, max_steps=5, out=str(tmp_path / "n")))
    assert not (tmp_path / "n" / "ckpt.pt").exists()


def test_a_second_train_on_a_live_run_folder_refuses(tmp_path, parts):
    quick = lambda **kw: tiny(data=str(parts), holdout=0, **kw)
    D.train(*quick(max_steps=1, out=str(tmp_path / "r")))
    held = checkpoints.lock_run(tmp_path / "r")  # as a live training process holds it
    try:
        with pytest.raises(SystemExit, match=rf"being trained by another process \(pid {os.getpid()}\)"):
            D.train(*quick(max_steps=2, out=str(tmp_path / "r")), resume=True)
    finally:
        held.close()
    D.train(*quick(max_steps=2, out=str(tmp_path / "r")), resume=True)  # free again


def wait_for(cond, timeout=120):
    t0 = time.time()
    while not cond():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path, parts):
    """Ctrl-C / SIGTERM checkpoints the current step and says how to resume; kill -9 (of the resumed run) loses at
    most --ckpt-every steps; the run then resumes to the weights of an uninterrupted one, its log complete."""
    flags = tiny_flags(data=str(parts), holdout=0, ckpt_every=2) + ["--max-steps", "10", "--device", "cpu"]
    D.main(["train", *flags, "--out", str(tmp_path / "ref")])
    cmd = [sys.executable, "diffusionad.py", "train", *flags, "--out", str(tmp_path / "run")]
    ckpt = tmp_path / "run" / "ckpt.pt"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(ckpt.exists)
    proc.send_signal(signal.SIGTERM)  # a checkpoint of the current step, and how to resume
    _, err = proc.communicate(timeout=120)
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 2 <= step < 10, "interrupt came too late to test anything"
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert f"interrupted at step {step}/10: the checkpoint of step {step} is at" in err and "--resume" in err
    written = ckpt.stat().st_mtime_ns
    proc = subprocess.Popen(cmd + ["--resume"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: ckpt.stat().st_mtime_ns != written)  # its first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    killed = torch.load(ckpt, weights_only=True)["step"]
    assert proc.returncode == -signal.SIGKILL and step < killed < 10 and killed % 2 == 0  # at most 2 steps lost
    D.main(["train", *flags, "--out", str(tmp_path / "run"), "--resume"])
    a, b = weights(tmp_path / "run"), weights(tmp_path / "ref")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    rows = [r.split(",")[0] for r in (tmp_path / "run" / "log.csv").read_text().splitlines()[1:]]
    assert rows == [str(i) for i in range(1, 11)]


def test_eval_never_overwrites_a_result_and_shows_progress(toy, tmp_path, capsys):
    cls, run = toy
    other = make_mvtec_tree(tmp_path / "b", name="other")
    own = (run / "metrics.json").read_text()
    D.main(["eval", "--run", str(run), "--data", str(other), "--eval-batch", "2", "--log-every", "1e-9"])
    D.main(["eval", "--run", str(run), "--eval-t", "100", "--amp"] if native_bf16() else ["eval", "--run", str(run), "--eval-t", "100"])
    out = capsys.readouterr().out
    assert (run / "metrics.json").read_text() == own
    assert (run / "eval_ckpt_other_t100+200.json").is_file()
    assert (run / ("eval_ckpt_toy_t100_amp.json" if native_bf16() else "eval_ckpt_toy_t100.json")).is_file()
    assert "2/6 test images" in out and "eta" in out
    for bad in (str(run / "metrics.json"), str(run / "eval_ckpt_other_t100+200.json")):
        with pytest.raises(SystemExit, match="pass a new file name"):
            D.main(["eval", "--run", str(run), "--json", bad])


def test_predict_skips_unreadable_files_and_never_overwrites(toy, tmp_path, capsys):
    cls, run = toy
    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.png").write_bytes((cls / f"test/good/00{i}.png").read_bytes())
    (folder / "3.png").write_bytes(b"broken")
    with pytest.raises(SystemExit, match=r"1 of 4 files could not be read and were skipped:\n  cannot read image .*3.png"):
        D.main(["predict", "--ckpt", str(run / "ckpt.pt"), str(folder), "--csv", str(tmp_path / "s.csv")])
    rows = (tmp_path / "s.csv").read_text().splitlines()
    assert len(rows) == 4 and all(Path(r.split(",")[3]).is_file() for r in rows[1:])
    out = Path(rows[1].split(",")[3]).parent
    assert out.parent == run and out.name.startswith("predictions-")
    with pytest.raises(SystemExit, match="is not empty: pass a new folder"):
        D.main(["predict", "--ckpt", str(run / "ckpt.pt"), str(folder / "0.png"), "--out", str(out)])
    with pytest.raises(SystemExit, match="exists: pass a new file name"):
        D.main(["predict", "--ckpt", str(run / "ckpt.pt"), str(folder / "0.png"), "--csv", str(tmp_path / "s.csv")])
    D.main(["predict", "--ckpt", str(run / "ckpt.pt"), str(folder / "0.png")])  # twice within a second:
    D.main(["predict", "--ckpt", str(run / "ckpt.pt"), str(folder / "0.png")])  # each in a new folder
    assert len(list(run.glob("predictions-*"))) >= 3


# ---------------------------------------------------------------- whole benchmarks and torchrun

def test_benchmark_root_trains_each_class_skips_finished_and_resumes(tmp_path, monkeypatch, capsys):
    root = tmp_path / "mvtec"
    make_mvtec_tree(root, name="toy")
    broken = make_mvtec_tree(root, name="zoo")
    mask = broken / "ground_truth/hole/001_mask.png"
    saved = mask.read_bytes()
    mask.unlink()
    monkeypatch.chdir(tmp_path)
    flags = ["train", "--data", str(root), "--max-steps", "2"] + tiny_flags(holdout=0)
    with pytest.raises(SystemExit, match=r"1 class\(es\) failed: zoo"):
        D.main(flags)
    out = capsys.readouterr()
    assert "001.png has no mask" in out.err
    table = (tmp_path / "runs/mvtec/table.md").read_text()
    assert "| toy |" in table and "| zoo | missing" in table and "| mean of 1/2 |" in table
    mask.write_bytes(saved)
    D.main(flags[:4] + ["1"] + flags[5:] + ["--out", "runs/mvtec/zoo", "--data", str(broken)])  # zoo: 1 step, then
    assert not (tmp_path / "runs/mvtec/zoo/metrics.json").exists() or True                   # (a finished 1-step run)
    (tmp_path / "runs/mvtec/zoo/metrics.json").unlink()                                       # as if interrupted
    D.main(flags)
    out = capsys.readouterr().out
    assert "toy: finished before, skipped" in out and "zoo: resuming" in out and "resuming runs/mvtec/zoo at step 1/2" in out
    assert json.loads((tmp_path / "runs/mvtec/zoo/metrics.json").read_text())["steps"] == 2
    table = (tmp_path / "runs/mvtec/table.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in table] == ["Class", "toy", "zoo", "mean"]
    D.main(["table", "runs/mvtec"])
    assert "| mean |" in capsys.readouterr().out


def test_activation_checkpointing_gives_the_same_losses_and_gradients():
    x0, mask = fixed_batch()
    runs_ = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = D.build_model(tiny_cfg())
        if checkpointing:
            assert speed.checkpoint_stages(model.denoiser) == len(model.denoiser.down) + 1 + len(model.denoiser.up)
        out = model(x0, mask, *draws(x0))
        out["total"].backward()
        runs_.append((out["total"].item(), [p.grad.clone() for p in model.parameters()]))
    (a, ga), (b, gb) = runs_
    assert a == b and all(torch.allclose(x, y, atol=1e-6) for x, y in zip(ga, gb))


def torchrun_worker(rank, world, port, jobs, result, cwd):
    """One torchrun-like rank running each argv of jobs in turn; per job it records the items it draws, what it
    writes, and its final weights."""
    import builtins
    import io
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1")
    os.chdir(cwd)
    torch.set_num_threads(1)
    get, place, real_open, replace_file = data.TrainSet.__getitem__, runs.Run.place, builtins.open, os.replace
    for k, argv in enumerate(jobs):
        os.environ["MASTER_PORT"] = str(port + k)
        seen, written, models = [], [], []
        data.TrainSet.__getitem__ = lambda self, key: (seen.append(key), get(self, key))[1]
        runs.Run.place = lambda self, model: (models.append(model), place(self, model))[1]

        def recording_open(f, mode="r", *a, **kw):
            if any(c in mode for c in "wax+"):
                written.append(str(f))
            return real_open(f, mode, *a, **kw)
        builtins.open = io.open = recording_open
        os.replace = lambda src, dst: (written.append(str(dst)), replace_file(src, dst))[1]  # atomic writes
        D.main(argv)
        builtins.open, io.open, os.replace = real_open, real_open, replace_file
        torch.save({"seen": seen, "written": written,
                    "weights": {k: v.clone() for k, v in models[-1].state_dict().items()}}, f"{result}{rank}_{k}.pt")


def test_torchrun_data_parallel_on_cpu_and_classes_spread_over_ranks(tmp_path, parts):
    """Two torchrun-like CPU processes (gloo): a benchmark root's classes spread over the ranks, then one class
    trained data-parallel for 2 steps and resumed to 4."""
    root = tmp_path / "mvtec"
    for name in ("a1", "b2", "c3"):
        make_mvtec_tree(root, name=name)
    run = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    jobs = [["train", "--data", str(root), "--max-steps", "1", "--device", "cpu"] + tiny_flags(holdout=0)]
    jobs += [["train", *tiny_flags(data=str(parts), holdout=0, ckpt_every=2), "--max-steps", str(steps), "--device",
              "cpu", "--out", str(run), *resume] for steps, resume in ((2, []), (4, ["--resume"]))]
    jobs += [["train", *tiny_flags(data=str(parts), holdout=0, variant="authors", batch_size=4), "--max-steps", "2",
              "--device", "cpu", "--out", str(tmp_path / "variant")]]  # the authors' variant, data-parallel
    torch.multiprocessing.spawn(torchrun_worker, args=(2, port, jobs, str(tmp_path / "rank"), str(tmp_path)), nprocs=2)
    for name in ("a1", "b2", "c3"):  # the benchmark: every class trained once, by one of the ranks
        m = json.loads((tmp_path / "runs/mvtec" / name / "metrics.json").read_text())
        assert m["steps"] == 1 and m["config"]["data"] == str(root / name)
    rows = (tmp_path / "runs/mvtec/table.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["Class", "a1", "b2", "c3", "mean"]  # the last one wrote it all
    for k in (1, 2):  # data-parallel, then resumed
        r0, r1 = (torch.load(tmp_path / f"rank{r}_{k}.pt", weights_only=False) for r in (0, 1))
        assert r0["seen"] and not set(r0["seen"]) & set(r1["seen"])  # each rank its own items
        assert all(torch.equal(r0["weights"][n], r1["weights"][n]) for n in r0["weights"])  # weights agree
        assert not [p for p in r1["written"] if str(run) in p]  # rank 1 writes nothing in the run folder
        assert any(p.endswith("ckpt.pt") for p in r0["written"]) and any(p.endswith("log.csv") for p in r0["written"])
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    assert ck["step"] == 4 and json.loads((run / "metrics.json").read_text())["steps"] == 4
    assert [r.split(",")[0] for r in (run / "log.csv").read_text().splitlines()[1:]] == ["1", "2", "3", "4"]
    assert len(r0["seen"]) == len(r1["seen"]) == 2 * 6  # the resumed steps 3, 4: 6 distinct images per rank and step
    v0, v1 = (torch.load(tmp_path / f"rank{r}_3.pt", weights_only=False) for r in (0, 1))
    assert all(torch.equal(v0["weights"][n], v1["weights"][n]) for n in v0["weights"])
    assert len(v0["seen"]) == 2 * 4 and not set(v0["seen"]) & set(v1["seen"])  # 4 independent draws per rank and step
    assert {s for _, _, s in v0["seen"] + v1["seen"]} == {True, False}  # some normal, some synthetic


# ---------------------------------------------------------------- speed paths give the same numbers

def test_compiled_training_step_and_inference_match_eager(monkeypatch):
    """Graph capture of both networks and of Alg. 2 (dynamo + AOT autograd, the part that can break on our
    code); the aot_eager backend skips inductor's C++ code generation, minutes on 2 cores."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "backend": "aot_eager"}))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    cfg, opts = tiny(eval_batch=4, num_res_blocks=1)  # fewer layers to trace, every kind of layer kept
    x0, mask = fixed_batch()
    models = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = D.build_model(cfg)
        if compiled:
            speed.compile_networks(model)
        out = model(x0, mask, *draws(x0))
        out["total"].backward()
        models.append((model, out))
    (eager, le), (comp, lc) = models
    assert torch.allclose(le["total"], lc["total"], atol=1e-4)
    for p, q in zip(eager.parameters(), comp.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-3)
    assert set(comp.state_dict()) == set(eager.state_dict())  # checkpoints keep their keys
    c = torch._dynamo.utils.counters
    assert c["stats"]["unique_graphs"] >= 2 and not c["graph_break"]  # both networks compiled whole
    images = torch.rand(6, 3, 32, 32)  # 6 = one full batch of 4 and one padded batch
    a = run_inference(eager, images, cfg, opts, torch.device("cpu"))
    b = run_inference(comp, images, cfg, replace(opts, compile=True), torch.device("cpu"))
    assert np.allclose(a[0], b[0], atol=1e-4) and np.allclose(a[1], b[1], atol=1e-4)
    assert "0 graph breaks" in speed.compile_report()


def run_script(name, *args, capsys):
    """A study script run as `python scripts/NAME ARGS` would, in this process (no second interpreter to start)."""
    capsys.readouterr()
    argv = sys.argv
    sys.argv = [str(ROOT / "scripts" / name), *args]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    finally:
        sys.argv = argv
    return capsys.readouterr().out


def test_diagnostic_scripts_run_on_a_trained_model(toy, capsys):
    ckpt = str(toy[1] / "ckpt.pt")
    out = run_script("train_check.py", ckpt, "--n", "3", capsys=capsys)
    assert "3 training images, whole: mean score" in out and "32-px crops" in out
    assert out.count("mean(x0_hat - x0) per channel") == 2  # t = 100 and 200
    out = run_script("bn_gap.py", ckpt, "--batches", "2", capsys=capsys)
    assert "first BatchNorm running var" in out and out.count("pixel AUROC") == 3
    out = run_script("resize_check.py", ckpt, "--n", "3", "--native", "128", capsys=capsys)
    assert "drawn at the training size" in out and "drawn at 128 px, resized" in out and out.count("PRO") == 2
    out = run_script("restoration_check.py", ckpt, "--t", "100,300", capsys=capsys)
    assert out.count("defect pixels |x0_hat - x0|") == 2 and "(3 anomalous images)" in out


# ---------------------------------------------------------------- noise-to-norm: reliance, warm-up, noise

def test_every_evaluation_reports_the_reliance_on_the_restoration(tmp_path, capsys):
    run = D.train(*tiny(data="synthetic", max_steps=2, out=str(tmp_path / "full")))
    m = json.loads((run / "metrics.json").read_text())
    assert set(m["reliance"]) == {"image_auroc", "pixel_auroc", "pixel_pro"}
    for k, drop in m["reliance"].items():
        assert drop == pytest.approx(m[k] - m["without_restoration"][k])
    assert "reliance on the restoration (drop with x0_hat := x0): image AUROC" in capsys.readouterr().out
    # x0_hat := x0 is the seg net on cat(x0, x0): the same as Alg. 2 with a restoration that returns x0
    cfg, opts = tiny(data="synthetic")
    model = D.build_model(cfg).eval()
    images = torch.rand(5, 3, 32, 32)
    maps, scores = reports.maps_without_restoration(model, images, opts, torch.device("cpu"))
    model.restore = lambda x0, t, eps: x0
    ref_maps, ref_scores, _, _ = run_inference(model, images, cfg, opts, torch.device("cpu"))
    assert np.allclose(maps, ref_maps, atol=1e-5) and np.allclose(scores, ref_scores, atol=1e-5)
    for ablation, has in (("seg-only", False), ("ae", True)):  # DRAEM+ has a reconstruction, seg-only none
        cfg, opts = tiny(data="synthetic", max_steps=1, ablation=ablation, out=str(tmp_path / ablation))
        run = D.train(cfg, opts, cls=D.model_class(opts))
        assert ("reliance" in json.loads((run / "metrics.json").read_text())) == has


def test_an_images_score_does_not_depend_on_its_batch():
    cfg, opts = tiny()
    model = D.build_model(cfg).eval()
    images = torch.rand(5, 3, 32, 32)
    _, scores, _, _ = run_inference(model, images, cfg, replace(opts, eval_batch=2), torch.device("cpu"))
    _, single, _, _ = run_inference(model, images.flip(0), cfg, replace(opts, eval_batch=1), torch.device("cpu"))
    assert np.allclose(scores, single[::-1], atol=1e-5)
    eps = inference_noise(0, 2, 32)
    assert eps.shape == (2, 3, 32, 32) and torch.equal(eps, inference_noise(0, 2, 32))


# ---------------------------------------------------------------- bugs found when reading the authors' code

def test_crops_of_an_image_and_of_its_anomaly_free_source_are_the_same_window():
    """--crop with --ablation ae: the reconstruction target is cropped where its image is (the AE loss of an exact
    autoencoder is zero); before, each image's crop was compared with another image's."""
    cfg, opts = tiny(ablation="ae", crop=32, img_size=64, device="cpu")
    fake = type("R", (), {"device": torch.device("cpu"), "opts": opts, "cfg": cfg, "world": 1, "rank": 0})()
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(6, 3, 64, 64, generator=g)
    x0, mask = clean.clone(), torch.zeros(6, 1, 64, 64)
    mask[3:, :, 40:50, 5:15] = 1
    x0[3:, :, 40:50, 5:15] = 1 - x0[3:, :, 40:50, 5:15]
    xc, mc, sc, _ = runs.Run.inputs(fake, {"image": x0, "mask": mask, "clean": clean}, step=3)
    assert xc.shape == sc.shape == (6, 3, 32, 32)
    assert torch.equal(xc * (1 - mc), sc * (1 - mc)) and mc[3:].flatten(1).sum(1).min() > 0
    model = ablations.DRAEMPlus(cfg)
    model.denoiser.forward = lambda x: x.clamp(-1, 1)  # a perfect autoencoder of the anomaly-free crops
    assert model(sc, mc, None, None, sc)["rec"].item() == 0.0


def test_maps_under_bf16_autocast_are_not_quantised_to_bf16():
    """--amp: the sigmoid of bf16 logits gave maps of bf16 values (ties in top-K, AUROC and PRO)."""
    model = D.DiffusionAD(tiny_cfg()).eval()
    x0 = torch.rand(4, 3, 32, 32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        maps, scores, _ = model.anomaly_maps(x0, (100,), torch.randn(1, 3, 32, 32))
    assert maps.dtype == torch.float32 and scores.dtype == torch.float32
    representable = (maps == maps.bfloat16().float()).float().mean().item()
    assert representable < 0.5, representable  # a float32 sigmoid: most values fall between bf16 steps


def test_the_autoencoder_restoration_is_clamped_like_the_denoisers():
    model = ablations.DRAEMPlus(tiny_cfg()).eval()
    with torch.no_grad():
        model.denoiser.out.weight.normal_(0, 100.0)  # outputs far outside the range
        raw = model.denoiser(torch.rand(2, 3, 32, 32))
        x_hat = model.restore(torch.rand(2, 3, 32, 32), None, None)
    assert raw.min() < -1 and raw.max() > 1 and x_hat.min() == -1.0 and x_hat.max() == 1.0
