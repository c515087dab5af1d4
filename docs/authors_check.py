"""Our networks against the authors' released modules: the same state_dict keys and shapes, the same outputs.

    git -C PATH/TO/DiffusionAD.git archive HEAD | tar -x -C /tmp/authors      # HuiZhang0812/DiffusionAD
    git -C PATH/TO/DRAEM.git archive HEAD | tar -x -C /tmp/draem              # VitjanZ/DRAEM (optional)
    python docs/authors_check.py --authors /tmp/authors --draem /tmp/draem [--size 256 --base 128]

Builds the authors' UNetModel and SegmentationSubNetwork from their files (imported from --authors at run time;
nothing of theirs is in this repository) with random weights: every parameter redrawn, the zero-initialised layers
included, and the BatchNorm running statistics perturbed. Saves them as their train.py saves a checkpoint, runs
`diffusionad.py import-authors` on it, and compares, on random images, the predicted noise at several t, the mask
probabilities, and Alg. 2 (t = 100 and 200, top-50) written out with their GaussianDiffusionModel (sample_q,
predict_x_0_from_eps, the clamp) against ours. Also counts parameters at the paper's configuration, and DRAEM's
reconstructive sub-network against our DRAEM+ autoencoder (--draem).
"""
import argparse
import subprocess
import sys
import tempfile
import types
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import ablations  # noqa: E402
import diffusionad as D  # noqa: E402
import runs  # noqa: E402


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--authors", required=True, help="a work tree of HuiZhang0812/DiffusionAD")
    ap.add_argument("--draem", help="a work tree of VitjanZ/DRAEM (for the DRAEM+ autoencoder's count)")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--base", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    a = ap.parse_args()
    sys.path.insert(0, a.authors)
    for name in ("matplotlib", "matplotlib.pyplot", "torchvision", "torchvision.transforms"):  # DDPM.py imports them
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["torchvision.transforms"].GaussianBlur = lambda **kw: None
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    from models.Recon_subnetwork import UNetModel
    from models.Seg_subnetwork import SegmentationSubNetwork
    from models.DDPM import GaussianDiffusionModel, get_beta_schedule

    count = lambda m: sum(p.numel() for p in m.parameters())
    with torch.device("meta"):
        cfg = D.Config()
        print(f"paper's configuration (256 px, base 128, attention 32,16,8, 4 heads): denoiser theirs "
              f"{count(UNetModel(256, 128, n_heads=4, in_channels=3)):,} ours {count(D.DenoisingUNet(cfg)):,}; "
              f"seg net theirs {count(SegmentationSubNetwork(6, 1)):,} ours {count(D.SegmentationUNet(6, 64)):,}")
        if a.draem:
            sys.path.insert(0, a.draem)
            from model_unet import ReconstructiveSubNetwork
            print(f"DRAEM+ autoencoder: DRAEM's ReconstructiveSubNetwork {count(ReconstructiveSubNetwork(3, 3)):,} "
                  f"ours {count(ablations.Autoencoder(128)):,}")

    g = torch.Generator().manual_seed(0)
    args = defaultdict(str, {"img_size": [a.size, a.size], "base_channels": a.base, "dropout": 0, "num_heads": 4,
                             "num_head_channels": -1, "channels": 3, "T": 1000, "beta_schedule": "linear",
                             "channel_mults": ""})
    unet = randomise(UNetModel(a.size, a.base, channel_mults="", dropout=0, n_heads=4, n_head_channels=-1,
                               in_channels=3), g).eval()
    seg = randomise(SegmentationSubNetwork(in_channels=6, out_channels=1), g).eval()
    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / "params-last.pt"
        torch.save({"n_epoch": 7, "unet_model_state_dict": unet.state_dict(),
                    "seg_model_state_dict": seg.state_dict(), "args": args}, params)
        subprocess.run([sys.executable, str(Path(D.__file__)), "import-authors", str(params), "--out",
                        str(Path(tmp) / "run"), "--device", "cpu"], check=True)
        state, cfg, opts = runs.load_checkpoint(Path(tmp) / "run" / "ckpt.pt", D.Config)
    model = D.build_model(cfg, state).eval()
    ddpm = GaussianDiffusionModel(args["img_size"], get_beta_schedule(1000, "linear"), img_channels=3)
    x0 = torch.rand(a.batch, 3, a.size, a.size, generator=g)
    worst = {}
    with torch.no_grad():
        for t in (0, 100, 200, 999):
            tt = torch.full((a.batch,), t)
            x_t = ddpm.sample_q(x0, tt, torch.randn(x0.shape, generator=g))
            worst[f"eps t={t}"] = (unet(x_t, tt) - model.denoiser(x_t, tt)).abs().max().item()
        both = torch.cat([x0, torch.rand(x0.shape, generator=g)], 1)
        worst["mask probability"] = (seg(both) - torch.sigmoid(model.seg(both))).abs().max().item()
        eps = D.inference_noise(cfg.seed, 2, a.size)  # Alg. 2's noise, one draw per time step
        theirs = []
        for k, t in enumerate((100, 200)):  # Alg. 2 written out with their modules
            tt = torch.full((a.batch,), t)
            x_t = ddpm.sample_q(x0, tt, eps[k].expand_as(x0))
            x0_hat = ddpm.predict_x_0_from_eps(x_t, tt, unet(x_t, tt)).clamp(-1, 1)
            theirs.append(seg(torch.cat([x0, x0_hat], 1))[:, 0])
        their_map = torch.stack(theirs).mean(0)
        their_score = their_map.flatten(1).topk(50, dim=1).values.mean(1)
        maps, scores, _ = model.anomaly_maps(x0, (100, 200), eps)
        worst["Alg. 2 map"] = (maps - their_map).abs().max().item()
        worst["Alg. 2 score"] = (scores - their_score).abs().max().item()
    print(f"outputs, {a.size} px, base {a.base}, {a.batch} random images, max |ours - theirs|:")
    for k, v in worst.items():
        print(f"  {k:<18} {v:.2e}")
    ok = max(worst.values()) <= 1e-4
    print("PASS: every difference <= 1e-4" if ok else "FAIL: a difference > 1e-4")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
