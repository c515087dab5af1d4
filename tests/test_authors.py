"""The authors' networks and checkpoints: state_dict names, shapes and parameter counts against facts recorded
from their released modules (tests/authors_state_dicts.json; no code of theirs is needed), and import-authors
end to end: a checkpoint in their train.py's format imports strictly, evaluates, predicts and exports."""
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

import diffusionad as D
from extras import import_authors
from extras.ablations import Autoencoder
from extras.authors import NormGuided, guided_restore, variant_train_loss
from extras.benchmarks import write_table
from extras.export import Alg2Program
from extras.folders import load_image
from extras.inference import run_inference
from extras.options import RunOptions, check_flags, config_and_options
from test_diffusionad import make_mvtec_tree

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from authors_check import pinned_inputs, pinned_variant_inputs  # noqa: E402  the inputs of the pinned values

FACTS = json.loads((Path(__file__).parent / "authors_state_dicts.json").read_text())


def shapes(sd):
    return {k: list(v.shape) for k, v in sd.items()}


def test_the_networks_are_the_authors_parameter_for_parameter():
    paper = FACTS["paper"]
    with torch.device("meta"):
        cfg = D.Config()
        fields = import_authors.authors_config(paper["args"])
        assert {k: getattr(cfg, k) for k in fields if k != "channel_mult"} == \
            {k: v for k, v in fields.items() if k != "channel_mult"}  # the paper's defaults are their args1.json
        denoiser, seg, ae = D.DenoisingUNet(cfg), D.SegmentationUNet(6, cfg.seg_channels), Autoencoder(128)
    theirs_unet, theirs_seg = import_authors.authors_weights(paper["unet_model_state_dict"], paper["seg_model_state_dict"])
    assert shapes(denoiser.state_dict()) == theirs_unet  # the same names (theirs) and shapes, nothing more
    assert shapes(seg.state_dict()) == theirs_seg  # DRAEM's discriminative net, under our names
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(denoiser) == 131_654_403 and count(seg) == 28_373_569  # the authors' modules at 256 px, base 128
    assert count(ae) == 69_048_579  # DRAEM's reconstructive sub-network at base 128 (DRAEM+)
    assert not any(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in denoiser.modules())  # pooling
    assert sum(m.how == "down" for m in denoiser.modules() if isinstance(m, D.ResBlock)) == 5  # BigGAN-style
    assert sum(m.how == "up" for m in denoiser.modules() if isinstance(m, D.ResBlock)) == 5


def test_the_time_embedding_is_sines_then_cosines():
    e = D.TimeEmbedding(8)(torch.tensor([0, 3]))
    assert torch.equal(e[0], torch.tensor([0.0] * 4 + [1.0] * 4))  # sin(0) first, then cos(0)
    assert torch.allclose(e[1, 0], torch.sin(torch.tensor(3.0))) and torch.allclose(e[1, 4], torch.cos(torch.tensor(3.0)))


def test_attention_reads_q_k_v_of_each_head_in_turn():
    att = D.Attention(64, 4).eval()
    torch.manual_seed(0)
    for p in att.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 64, 4, 4)
    qkv = att.to_qkv(att.norm(x.reshape(2, 64, 16)))  # (B, 3C, L): channels [h*48, h*48+16) are head h's q
    heads = []
    for h in range(4):
        q, k, v = qkv[:, 48 * h: 48 * (h + 1)].split(16, dim=1)  # (B, 16, L) each
        w = torch.softmax(torch.einsum("bcl,bcm->blm", q, k) / 4.0, dim=-1)  # 1/sqrt(16)
        heads.append(torch.einsum("blm,bcm->bcl", w, v))
    expected = x.reshape(2, 64, 16) + att.proj_out(torch.cat(heads, 1))
    assert torch.allclose(att(x), expected.reshape(2, 64, 4, 4), atol=1e-5)


def authors_checkpoint(path, facts=FACTS["small"], seed=0, args=None):
    """A file as their train.py writes it (torch.save of unet/seg state_dicts, a defaultdict(str) of args and
    n_epoch), with random weights of the recorded shapes and BatchNorm statistics away from 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    def tensor(name, shape):
        if name.endswith("num_batches_tracked"):
            return torch.tensor(1000)
        if name.endswith("running_var"):
            return torch.rand(shape, generator=g) + 0.5
        return torch.randn(shape, generator=g) * 0.05
    unet = {k: tensor(k, s) for k, s in facts["unet_model_state_dict"].items()}
    seg = {k: tensor(k, s) for k, s in facts["seg_model_state_dict"].items()}
    torch.save({"n_epoch": 3000, "unet_model_state_dict": unet, "seg_model_state_dict": seg,
                "args": defaultdict(str, args or facts["args"])}, path)
    return unet, seg


def test_an_authors_checkpoint_imports_strictly_and_runs_every_command(tmp_path, capsys):
    unet, seg = authors_checkpoint(tmp_path / "params-best.pt")
    cls = make_mvtec_tree(tmp_path, size=40)
    run = tmp_path / "imported"
    D.main(["import-authors", str(tmp_path / "params-best.pt"), "--out", str(run), "--data", str(cls),
            "--threshold-from", str(cls / "test" / "good"), "--eval-batch", "4"])
    out = capsys.readouterr().out
    assert "importing" in out and "32 px, base 32, multipliers 1,2,3,4, T = 1000" in out
    assert "evaluated as their eval.py (guided, t = 200,400, w = 1.0) unless eval --alg2" in out
    assert "note: params-best.pt is the epoch their train.py chose on the test split" in out
    model, cfg = D.load(run, cls=D.DiffusionAD)  # their networks as the paper's DiffusionAD
    state = torch.load(run / "ckpt.pt", weights_only=True)
    assert (cfg.img_size, cfg.base_channels, cfg.num_heads) == (32, 32, 4)
    assert all(torch.equal(model.denoiser.state_dict()[k], v) for k, v in unet.items())
    ours = model.seg.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in import_authors.authors_weights({}, seg)[1].items()) and len(ours) == len(seg)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert model.denoiser(x, torch.tensor([100, 200])).shape == (2, 3, 32, 32)  # predicts eps
        assert model.seg(torch.cat([x, x], 1)).shape == (2, 1, 32, 32)  # mask logits
    m = json.loads((run / "metrics.json").read_text())  # evaluated on the class's test split at import
    assert m["n_test_good"] == 3 and m["n_test_anomalous"] == 3 and m["imported"].endswith("params-best.pt")
    assert state["threshold"]["n_held_out"] == 3 and state["imported"]["n_epoch"] == 3000
    D.main(["eval", "--run", str(run)])  # the recorded data, their guided evaluation
    D.main(["eval", "--run", str(run), "--alg2"])  # the paper's Alg. 2, at its t = 100, 200
    guided, alg2 = (json.loads((run / f"eval_ckpt_toy_{n}.json").read_text()) for n in ("t200+400", "t100+200_alg2"))
    assert guided["image_auroc"] == m["image_auroc"] and alg2["config"]["variant"] == "paper"
    assert guided["flagged"]["threshold"] == state["threshold"]["value"] and "flagged" not in alg2  # its inference's
    capsys.readouterr()
    D.main(["predict", "--run", str(run), str(cls / "test" / "hole"), "--csv", str(tmp_path / "p.csv")])
    assert "of 3 images flagged as anomalous" in capsys.readouterr().out
    predicted = [float(r.split(",")[1]) for r in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    # export's module on the imported model: the guided inference (torch.export of a variant run: test_own_images)
    imported, _ = D.load(run)  # the run's own class: their released version
    assert type(imported) is NormGuided and type(model) is D.DiffusionAD
    program = Alg2Program(imported, cfg)
    images = torch.stack([load_image(p, 32) for p in sorted((cls / "test" / "hole").iterdir())])
    with torch.no_grad():
        assert np.allclose(program(images)[1].numpy(), predicted, atol=1e-4)
    bench = tmp_path / "bench"  # a benchmark folder of imported classes: the table reads it
    bench.mkdir()
    run.rename(bench / "toy")
    assert "| toy |" in write_table(bench)


# Their values on authors_checkpoint(seed 0), `python scripts/authors_check.py --authors A --pin PARAMS.pt` with their
# code (never needed here): the paper's Alg. 1 composed from their functions (calc_loss, predict_x_0_from_eps, clamp
# (-1, 1), their seg net, train.py's BinaryFocalLoss and SmoothL1Loss) with L_noise over every image; their released
# training step (norm_guided_one_step_denoising, same losses); their guided estimate
# (norm_guided_one_step_denoising_eval); their eval.py's maps at t = 200, 400 with Alg. 2's fixed noise of seed 0.
PINNED = {"alg1": {"noise": 0.9934352040290833, "mask": 0.22819361090660095, "total": 1.2216287851333618},
          "variant": {"noise": 1.988249659538269, "mask": 0.22821736335754395, "total": 2.2164669036865234},
          "guided": {"sum": 6443.987309571356, "abs_sum": 9148.072135555558,
                     "first": [0.8607391715049744, -0.12558244168758392, 0.20983381569385529, 0.8889399170875549]},
          "eval_maps": {"sum": 3049.225845068693, "scores": [0.496785044670105, 0.49678507447242737, 0.496785044670105,
                                                             0.49678507447242737, 0.49678507447242737, 0.496785044670105]}}


def test_alg1_and_the_authors_variant_equal_their_functions_on_pinned_values(tmp_path):
    authors_checkpoint(tmp_path / "p.pt")
    D.main(["import-authors", str(tmp_path / "p.pt"), "--out", str(tmp_path / "r")])
    imported, cfg = D.load(tmp_path / "r")  # the documented way: the run's own class, their released version
    assert (type(imported), cfg.eval_t, imported.w, imported.guide_t) == (NormGuided, (200, 400), 1.0, 300)  # args1.json
    fresh = lambda: D.load(tmp_path / "r", cls=D.DiffusionAD)[0]  # their networks as the paper's DiffusionAD
    opts = RunOptions(variant="authors", eval_batch=8, log_every=1e9)
    v = pinned_variant_inputs(cfg.img_size)  # x0, mask, is_normal, t_normal, t_noisier, eps_normal, eps_noisier
    with torch.no_grad():  # their guided estimate, and their eval.py's maps through our eval of the imported run
        x0_hat = guided_restore(fresh().eval(), v[0], *v[3:], 1.0).double()
        maps = run_inference(imported, v[0], cfg, opts, torch.device("cpu"))[0]
    assert abs(x0_hat.sum().item() - PINNED["guided"]["sum"]) < 1e-2
    assert abs(x0_hat.abs().sum().item() - PINNED["guided"]["abs_sum"]) < 1e-2
    assert np.allclose(x0_hat.flatten()[:4].numpy(), PINNED["guided"]["first"], atol=1e-5)
    assert abs(maps.astype(np.float64).sum() - PINNED["eval_maps"]["sum"]) < 1e-2
    assert np.allclose(np.sort(maps.reshape(6, -1), 1)[:, -50:].mean(1), PINNED["eval_maps"]["scores"], atol=1e-5)
    x0, mask, t, eps = pinned_inputs(cfg.img_size)  # training mode (BatchNorm over the batch), as their train.py
    for name, out in (("alg1", fresh().train().train_loss(x0, mask, t, eps)),
                      ("variant", variant_train_loss(fresh().train(), *v, 1.0))):
        for k, value in PINNED[name].items():
            assert abs(out[k].item() - value) < 1e-6, (name, k, out[k].item(), value)
    with torch.no_grad():  # over the normal half alone (the authors' later code), Alg. 1's L_noise would differ
        model = fresh()
        half = (model.denoiser(model.q_sample(x0, t, eps), t) - eps)[:3].square().mean().item()
    assert abs(half - PINNED["alg1"]["noise"]) > 1e-3


def test_an_imported_run_without_data_and_bad_files_are_one_clear_line(tmp_path):
    authors_checkpoint(tmp_path / "p.pt")
    D.main(["import-authors", str(tmp_path / "p.pt"), "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="names no data .*pass --data ROOT/CLASS"):
        D.main(["eval", "--run", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="ckpt.pt exists: pass a new --out"):
        D.main(["import-authors", str(tmp_path / "p.pt"), "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="was imported from the authors' checkpoint and holds no optimizer state"):
        D.main(["train", "--out", str(tmp_path / "r"), "--resume", "--img-size", "32", "--base-channels", "32"])
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(SystemExit, match="junk.pt: not a readable checkpoint"):
        D.main(["import-authors", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "j")])
    torch.save({"denoiser": {}}, tmp_path / "ours.pt")
    with pytest.raises(SystemExit, match="not a checkpoint of the authors' train.py"):
        D.main(["import-authors", str(tmp_path / "ours.pt"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="no file at"):
        D.main(["import-authors", str(tmp_path / "none.pt"), "--out", str(tmp_path / "n")])
    unet, seg = authors_checkpoint(tmp_path / "ok.pt")  # their keys, values of the wrong type: one line each
    for name, ckpt, message in (("args.pt", {"args": "img_size=256"}, "its args are a str, not the dict of settings"),
                                ("seg.pt", {"seg_model_state_dict": list(seg.values())},
                                 "its seg_model_state_dict is a list, not a state dict of tensors")):
        torch.save({"n_epoch": 1, "unet_model_state_dict": unet, "seg_model_state_dict": seg, "args": {}, **ckpt},
                   tmp_path / name)
        with pytest.raises(SystemExit, match=message):
            D.main(["import-authors", str(tmp_path / name), "--out", str(tmp_path / "bad")])
    authors_checkpoint(tmp_path / "wide.pt", args={**FACTS["small"]["args"], "img_size": [32, 64]})
    with pytest.raises(SystemExit, match=r"its args cannot be mapped.*\[32, 64\]: only square images"):
        D.main(["import-authors", str(tmp_path / "wide.pt"), "--out", str(tmp_path / "w")])
    authors_checkpoint(tmp_path / "other.pt", args={**FACTS["small"]["args"], "base_channels": 64})
    with pytest.raises(SystemExit, match="other.pt: the weights do not fit the networks its args describe"):
        D.main(["import-authors", str(tmp_path / "other.pt"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists() and not (tmp_path / "w").exists()  # nothing written on an error


def test_channels_per_head_set_the_heads_of_each_attention_layer():
    cfg = check_flags(*config_and_options({"img_size": 32, "base_channels": 16, "channel_mult": (1, 2),
                                     "attn_resolutions": (32, 16), "num_head_channels": 8}, D.Config), D.channel_mult)[0]
    heads = {m.norm.num_channels: m.heads for m in D.DenoisingUNet(cfg).modules() if isinstance(m, D.Attention)}
    assert heads == {16: 2, 32: 4}  # the authors' n_head_channels: width // channels per head
