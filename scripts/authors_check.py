"""Our networks against the authors' released modules: the same state_dict keys and shapes, the same outputs.

    git -C PATH/TO/DiffusionAD.git archive HEAD | tar -x -C /tmp/authors      # HuiZhang0812/DiffusionAD
    git -C PATH/TO/DRAEM.git archive HEAD | tar -x -C /tmp/draem              # VitjanZ/DRAEM (optional)
    python scripts/authors_check.py --authors /tmp/authors --draem /tmp/draem [--size 256 --base 128]

Builds the authors' UNetModel and SegmentationSubNetwork from their files (imported from --authors at run time;
nothing of theirs is in this repository) with random weights: every parameter redrawn, the zero-initialised layers
included, and the BatchNorm running statistics perturbed. Saves them as their train.py saves a checkpoint, runs
`diffusionad.py import-authors` on it, and compares, on random images, the predicted noise at several t, the mask
probabilities, and Alg. 2 (t = 100 and 200, top-50) written out with their GaussianDiffusionModel (sample_q,
predict_x_0_from_eps, the clamp) against ours. Also counts parameters at the paper's configuration, and DRAEM's
reconstructive sub-network against our DRAEM+ autoencoder (--draem).

Alg. 1: DiffusionAD.train_loss against the paper's Alg. 1 composed from their functions (calc_loss with our noise,
predict_x_0_from_eps, clamp (-1, 1), their seg net, train.py's BinaryFocalLoss and SmoothL1Loss, total = L_noise
+ 5 focal + SmoothL1) with L_noise averaged over every image, both nets in training mode (BatchNorm over the
batch): the losses, and every parameter's gradient (relative L2 difference).

    python scripts/authors_check.py --authors /tmp/authors --pin PARAMS.pt

prints, as JSON, their values on the checkpoint PARAMS.pt (tests/test_authors.py writes it) for the inputs of
pinned_inputs(): the pinned values that tests/test_authors.py checks ours against without their code.
"""
import argparse
import ast
import json
import subprocess
import sys
import tempfile
import types
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffusionad  # noqa: E402
from extras.ablations import Autoencoder  # noqa: E402
from extras.authors import guided_restore, variant_train_loss  # noqa: E402
from extras.import_authors import authors_weights  # noqa: E402
from extras.inference import inference_noise, run_inference  # noqa: E402
from extras.options import RunOptions  # noqa: E402


def randomise(net, g):
    """Every parameter N(0, 0.05) (zero-initialised ones too), BatchNorm statistics away from 0 and 1."""
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net


def pinned_inputs(size, batch=6):
    """The fixed batch of the pinned checks (the same code is in tests/test_authors.py): 3 normal + 3 synthetic
    images (a square inverted), their masks, t and eps as Alg. 1 draws them."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(batch, 3, size, size, generator=g)
    mask = torch.zeros(batch, 1, size, size)
    mask[batch // 2:, :, size // 4: size // 2, size // 4: size // 2] = 1
    x0 = torch.where(mask > 0, 1 - x0, x0)
    return x0, mask, torch.randint(0, 1000, (batch,), generator=g), torch.randn(x0.shape, generator=g)


def their_focal_loss(authors):
    """train.py's BinaryFocalLoss, taken from their file at run time (train.py itself imports half of PyPI)."""
    tree = ast.parse((Path(authors) / "train.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "BinaryFocalLoss")
    ns = {"torch": torch, "nn": torch.nn, "F": torch.nn.functional}
    exec(compile(ast.Module([node], []), "train.py", "exec"), ns)
    return ns["BinaryFocalLoss"]()


def their_alg1(unet, seg, ddpm, focal, x0, mask, t, eps):
    """The paper's Alg. 1 from their functions, L_noise over every image: (losses, the total)."""
    ddpm.noise_fn = lambda x, tt: eps  # calc_loss draws its noise with noise_fn: ours instead
    loss, x_t, eps_hat = ddpm.calc_loss(unet, x0, t)
    x0_hat = ddpm.predict_x_0_from_eps(x_t, t, eps_hat).clamp(-1, 1)
    pred = seg(torch.cat([x0, x0_hat], 1))
    noise, mask_loss = loss["loss"].mean(), 5 * focal(pred, mask) + torch.nn.SmoothL1Loss()(pred, mask)
    return {"noise": noise, "mask": mask_loss, "total": noise + mask_loss}


def pinned_variant_inputs(size, batch=6):
    """pinned_inputs and the variant's second draws (the same code is in tests/test_authors.py): is_normal, the
    normal and noisier t, their noises."""
    x0, mask, _, _ = pinned_inputs(size, batch)
    g = torch.Generator().manual_seed(2)
    t_normal, t_noisier = torch.randint(0, 300, (batch,), generator=g), torch.randint(300, 1000, (batch,), generator=g)
    return (x0, mask, mask.flatten(1).amax(1) == 0, t_normal, t_noisier, torch.randn(x0.shape, generator=g),
            torch.randn(x0.shape, generator=g))


def their_guided(unet, ddpm, x0, t_normal, t_noisier, eps_normal, eps_noisier, w):
    """Their norm_guided_one_step_denoising_eval's guided estimate, with our noises (calc_loss draws normal first)."""
    noises = iter([eps_normal, eps_noisier])
    ddpm.noise_fn = lambda x, t: next(noises)
    return ddpm.norm_guided_one_step_denoising_eval(unet, x0, t_normal, t_noisier, {"condition_w": w})[1]


def their_variant(unet, seg, ddpm, focal, x0, mask, is_normal, t_normal, t_noisier, eps_normal, eps_noisier, w):
    """Their train.py step: norm_guided_one_step_denoising (its t and noise draws replaced by ours), the seg net on
    cat(x0, guided x0_hat), total = noise + 5 focal + SmoothL1."""
    noises, ts, randint = iter([eps_normal, eps_noisier]), iter([t_normal, t_noisier]), torch.randint
    ddpm.noise_fn = lambda x, t: next(noises)
    torch.randint = lambda *a, **k: next(ts)
    try:
        noise, x0_hat = ddpm.norm_guided_one_step_denoising(unet, x0, (~is_normal).float(),
                                                            {"less_t_range": 300, "condition_w": w})[:2]
    finally:
        torch.randint = randint
    pred = seg(torch.cat([x0, x0_hat], 1))
    mask_loss = 5 * focal(pred, mask) + torch.nn.SmoothL1Loss()(pred, mask)
    return {"noise": noise, "mask": mask_loss, "total": noise + mask_loss}


def their_eval_maps(unet, seg, ddpm, images, noise, ts, w):
    """Their eval.py's maps, image by image (their test loader's batch of 1), with Alg. 2's fixed noise."""
    out = []
    for x in images.split(1):
        t_normal, t_noisier = (torch.full((1,), t) for t in ts)
        x0_hat = their_guided(unet, ddpm, x, t_normal, t_noisier, noise[0:1], noise[1:2], w)
        out.append(seg(torch.cat([x, x0_hat], 1))[:, 0])
    return torch.cat(out)


def compare_losses(theirs_fn, ours_fn, unet, seg, model):
    """Both training steps from zero gradients, training mode: their losses, the largest loss difference, the
    parameter with the largest relative gradient difference (their names) and that difference."""
    unet.train(), seg.train(), model.train()
    for net in (unet, seg, model):
        net.zero_grad()
    theirs, ours = theirs_fn(), ours_fn()
    theirs["total"].backward()
    ours["total"].backward()
    loss_diff = max(abs(theirs[k].item() - ours[k].item()) for k in ("noise", "mask", "total"))
    grads = {f"unet.{k}": (p.grad, dict(model.denoiser.named_parameters())[k].grad) for k, p in unet.named_parameters()}
    seg_ours = dict(model.seg.named_parameters())
    names = {theirs: ours for ours, theirs in authors_weights({}, {k: k for k, _ in seg.named_parameters()})[1].items()}
    grads.update({f"seg.{names[k]}": (p.grad, seg_ours[names[k]].grad) for k, p in seg.named_parameters()})
    # relative to the tensor's gradient, floored at 1e-3 of its network's: a conv bias before a BatchNorm has a
    # gradient of zero up to float rounding, so its own relative difference is noise
    scale = {net: torch.cat([a.flatten() for k, (a, _) in grads.items() if k.startswith(net)]).norm()
             for net in ("unet", "seg")}
    rel = {k: ((a - b).norm() / torch.maximum(a.norm(), 1e-3 * scale[k.split(".")[0]])).item()
           for k, (a, b) in grads.items()}
    worst = max(rel, key=rel.get)
    return theirs, loss_diff, worst, rel[worst]


def their_modules(args):
    """Their UNetModel, SegmentationSubNetwork, GaussianDiffusionModel, get_beta_schedule and focal loss, imported from
    the work tree args.authors (DDPM.py's plotting imports stubbed)."""
    sys.path.insert(0, args.authors)
    for name in ("matplotlib", "matplotlib.pyplot", "torchvision", "torchvision.transforms"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["torchvision.transforms"].GaussianBlur = lambda **kw: None
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    from models.Recon_subnetwork import UNetModel
    from models.Seg_subnetwork import SegmentationSubNetwork
    from models.DDPM import GaussianDiffusionModel, get_beta_schedule
    return UNetModel, SegmentationSubNetwork, GaussianDiffusionModel, get_beta_schedule, their_focal_loss(args.authors)


def count_parameters(args, UNetModel, SegmentationSubNetwork):
    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        cfg = diffusionad.Config()
        print(f"paper's configuration (256 px, base 128, attention 32,16,8, 4 heads): denoiser theirs "
              f"{count(UNetModel(256, 128, n_heads=4, in_channels=3)):,} ours {count(diffusionad.DenoisingUNet(cfg)):,}; "
              f"seg net theirs {count(SegmentationSubNetwork(6, 1)):,} ours {count(diffusionad.SegmentationUNet(6, 64)):,}")
        if args.draem:
            sys.path.insert(0, args.draem)
            from model_unet import ReconstructiveSubNetwork
            print(f"DRAEM+ autoencoder: DRAEM's ReconstructiveSubNetwork {count(ReconstructiveSubNetwork(3, 3)):,} "
                  f"ours {count(Autoencoder(128)):,}")


def imported_pair(args, UNetModel, SegmentationSubNetwork, g):
    """Their networks with random weights, saved as their train.py saves them and imported by import-authors: (their
    UNet, their seg net, the run as the paper's DiffusionAD, the run as itself (their version), its Config, args)."""
    theirs = defaultdict(str, {"img_size": [args.size, args.size], "base_channels": args.base, "dropout": 0,
                               "num_heads": 4, "num_head_channels": -1, "channels": 3, "T": 1000,
                               "beta_schedule": "linear", "channel_mults": ""})
    unet = randomise(UNetModel(args.size, args.base, channel_mults="", dropout=0, n_heads=4, n_head_channels=-1,
                               in_channels=3), g).eval()
    seg = randomise(SegmentationSubNetwork(in_channels=6, out_channels=1), g).eval()
    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / "params-last.pt"
        torch.save({"n_epoch": 7, "unet_model_state_dict": unet.state_dict(),
                    "seg_model_state_dict": seg.state_dict(), "args": theirs}, params)
        subprocess.run([sys.executable, str(Path(diffusionad.__file__)), "import-authors", str(params), "--out",
                        str(Path(tmp) / "run"), "--device", "cpu"], check=True)
        model, cfg = diffusionad.load(Path(tmp) / "run", cls=diffusionad.DiffusionAD)  # their networks as the paper's DiffusionAD
        imported = diffusionad.load(Path(tmp) / "run")[0]  # the run's own class: their released version
    return unet, seg, model, imported, cfg, theirs


def compare_outputs(args, unet, seg, ddpm, model, cfg, g):
    """max |ours - theirs| of the predicted noise at several t, the mask probabilities and Alg. 2's map and score."""
    x0 = torch.rand(args.batch, 3, args.size, args.size, generator=g)
    worst = {}
    with torch.no_grad():
        for t in (0, 100, 200, 999):
            tt = torch.full((args.batch,), t)
            x_t = ddpm.sample_q(x0, tt, torch.randn(x0.shape, generator=g))
            worst[f"eps t={t}"] = (unet(x_t, tt) - model.denoiser(x_t, tt)).abs().max().item()
        both = torch.cat([x0, torch.rand(x0.shape, generator=g)], 1)
        worst["mask probability"] = (seg(both) - torch.sigmoid(model.seg(both))).abs().max().item()
        eps = inference_noise(cfg.seed, 2, args.size)  # Alg. 2's noise, one draw per time step
        theirs = []
        for k, t in enumerate((100, 200)):  # Alg. 2 written out with their modules
            tt = torch.full((args.batch,), t)
            x_t = ddpm.sample_q(x0, tt, eps[k].expand_as(x0))
            x0_hat = ddpm.predict_x_0_from_eps(x_t, tt, unet(x_t, tt)).clamp(-1, 1)
            theirs.append(seg(torch.cat([x0, x0_hat], 1))[:, 0])
        their_map = torch.stack(theirs).mean(0)
        their_score = their_map.flatten(1).topk(50, dim=1).values.mean(1)
        maps, scores, _ = model.anomaly_maps(x0, (100, 200), eps)
        worst["Alg. 2 map"] = (maps - their_map).abs().max().item()
        worst["Alg. 2 score"] = (scores - their_score).abs().max().item()
    print(f"outputs, {args.size} px, base {args.base}, {args.batch} random images, max |ours - theirs|:")
    for k, v in worst.items():
        print(f"  {k:<18} {v:.2e}")
    return max(worst.values()) <= 1e-4


def compare_variant(args, unet, seg, ddpm, model, imported, cfg):
    """Their guided restoration and eval.py's maps against ours (eval mode); True when within 1e-5."""
    v, w = pinned_variant_inputs(args.size), 1.0  # x0, mask, is_normal, t_normal, t_noisier, eps_normal, eps_noisier
    unet.eval(), seg.eval(), model.eval()  # before the training-mode steps move the BatchNorm statistics
    with torch.no_grad():
        restored = (their_guided(unet, ddpm, v[0], *v[3:], w) - guided_restore(model, v[0], *v[3:], w))
        noise = inference_noise(cfg.seed, 2, args.size)
        ours_maps = run_inference(imported, v[0], diffusionad.Config(**{**vars(cfg), "eval_t": (200, 400)}),
                                  RunOptions(variant="authors", eval_batch=4, log_every=1e9), torch.device("cpu"))[0]
        theirs_maps = their_eval_maps(unet, seg, ddpm, v[0], noise, (200, 400), w)
    diff_restore, diff_maps = restored.abs().max().item(), (torch.from_numpy(ours_maps) - theirs_maps).abs().max().item()
    print(f"guided restoration (eval mode): max |ours - theirs| {diff_restore:.2e}; the maps of an imported run's "
          f"eval against their eval.py's (t = 200, 400, the same noise, 6 images): {diff_maps:.2e}")
    return diff_restore <= 1e-5 and diff_maps <= 1e-5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--authors", required=True, help="a work tree of HuiZhang0812/DiffusionAD")
    ap.add_argument("--draem", help="a work tree of VitjanZ/DRAEM (for the DRAEM+ autoencoder's count)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--base", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--pin", help="an authors' checkpoint: print their values on pinned_inputs as JSON, and stop")
    args = ap.parse_args()
    UNetModel, SegmentationSubNetwork, GaussianDiffusionModel, get_beta_schedule, focal = their_modules(args)
    if args.pin:
        return pin(args, UNetModel, SegmentationSubNetwork, GaussianDiffusionModel, get_beta_schedule, focal)
    count_parameters(args, UNetModel, SegmentationSubNetwork)
    g = torch.Generator().manual_seed(0)
    unet, seg, model, imported, cfg, theirs = imported_pair(args, UNetModel, SegmentationSubNetwork, g)
    ddpm = GaussianDiffusionModel(theirs["img_size"], get_beta_schedule(1000, "linear"), img_channels=3)
    ok = compare_outputs(args, unet, seg, ddpm, model, cfg, g)
    ok = compare_variant(args, unet, seg, ddpm, model, imported, cfg) and ok
    x0, mask, t, eps = pinned_inputs(args.size)
    _, loss_diff, name, rel = compare_losses(lambda: their_alg1(unet, seg, ddpm, focal, x0, mask, t, eps),
                                             lambda: model.train_loss(x0, mask, t, eps), unet, seg, model)
    print(f"Alg. 1 on 3 normal + 3 synthetic images, training mode: max |loss ours - theirs| {loss_diff:.2e} "
          f"(noise, mask, total); largest relative gradient difference {rel:.2e} ({name})")
    ok = ok and loss_diff <= 1e-6 and rel <= 2e-2
    v, w = pinned_variant_inputs(args.size), 1.0
    _, loss_diff, name, rel = compare_losses(lambda: their_variant(unet, seg, ddpm, focal, *v, w),
                                             lambda: variant_train_loss(model, *v, w), unet, seg, model)
    print(f"their training step (norm-guided), training mode: max |loss ours - theirs| {loss_diff:.2e}; largest "
          f"relative gradient difference {rel:.2e} ({name})")
    ok = ok and loss_diff <= 1e-6 and rel <= 2e-2
    print("PASS: outputs <= 1e-4, losses <= 1e-6, gradients <= 2e-2 relative, guided restoration and maps <= 1e-5"
          if ok else "FAIL")
    sys.exit(0 if ok else 1)


def pin(args, UNetModel, SegmentationSubNetwork, GaussianDiffusionModel, get_beta_schedule, focal):
    """Their values on the checkpoint args.pin for pinned_inputs, as JSON."""
    ckpt = torch.load(args.pin, weights_only=False)
    theirs = ckpt["args"]
    unet = UNetModel(theirs["img_size"][0], theirs["base_channels"], channel_mults=theirs["channel_mults"], dropout=0,
                     n_heads=theirs["num_heads"], n_head_channels=theirs["num_head_channels"], in_channels=3)
    unet.load_state_dict(ckpt["unet_model_state_dict"])
    seg = SegmentationSubNetwork(in_channels=6, out_channels=1,
                                 base_channels=ckpt["seg_model_state_dict"]["encoder_segment.block1.0.weight"].shape[0])
    seg.load_state_dict(ckpt["seg_model_state_dict"])
    ddpm = GaussianDiffusionModel(theirs["img_size"], get_beta_schedule(1000, "linear"), img_channels=3)
    size = theirs["img_size"][0]
    v = pinned_variant_inputs(size)
    unet.eval(), seg.eval()  # first: the training-mode steps below move the BatchNorm statistics
    with torch.no_grad():
        x0_hat = their_guided(unet, ddpm, v[0], *v[3:], 1.0)
        maps = their_eval_maps(unet, seg, ddpm, v[0], inference_noise(0, 2, size), (200, 400), 1.0)
    pins = {"guided": {"sum": x0_hat.double().sum().item(), "abs_sum": x0_hat.double().abs().sum().item(),
                       "first": x0_hat.flatten()[:4].tolist()},
            "eval_maps": {"sum": maps.double().sum().item(), "scores": maps.flatten(1).topk(50, 1).values.mean(1).tolist()}}
    x0, mask, t, eps = pinned_inputs(size)
    unet.train(), seg.train()
    pins["alg1"] = {k: v.item() for k, v in their_alg1(unet, seg, ddpm, focal, x0, mask, t, eps).items()}
    seg.load_state_dict(ckpt["seg_model_state_dict"])  # each step from the checkpoint's statistics
    pins["variant"] = {k: x.item() for k, x in their_variant(unet, seg, ddpm, focal, *v, 1.0).items()}
    print(json.dumps(pins, indent=1))


if __name__ == "__main__":
    main()
