"""A user's own images: a plain folder trains, a labelled test folder is optional, a threshold travels with
the model, predict decides, export runs without our code, a CPU user of the paper's size is told."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import diffusionad as D
from extras import folders, reports, speed, thresholds
from extras.export import Alg2Program
from extras.options import RunOptions

FLAGS = ["--img-size", "32", "--base-channels", "16", "--channel-mult", "1,2", "--attn-resolutions", "16",
         "--seg-channels", "4", "--workers", "0", "--eval-batch", "4", "--log-every", "1000", "--max-steps", "2"]


def part(seed, size=40, spot=False):
    """A grey part with a bright bar; spot=True adds a dark square (a defect) and returns its mask too."""
    rng = np.random.default_rng(seed)
    img = (rng.random((size, size, 3)) * 40 + 90).astype(np.uint8)
    img[:, 18:22] = 200
    mask = np.zeros((size, size), np.uint8)
    if spot:
        img[5:12, 5:12], mask[5:12, 5:12] = 10, 255
    return img, mask


def plain_folder(root, n=24):
    """n normal images at several depths, with every accepted extension in mixed case."""
    exts = [".png", ".JPG", ".jpeg", ".bmp", ".TIF", ".png"]
    for i in range(n):
        sub = root / ("" if i % 3 == 0 else "line_a" if i % 3 == 1 else "line_b/day2")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(part(i)[0]).save(sub / f"p{i:03d}{exts[i % len(exts)]}")
    (root / "notes.txt").write_text("not an image")
    return root


def labelled(root, masks=True):
    """TEST/good, TEST/spot (masks in TEST/masks/spot/<stem>.png when masks), TEST/dent (never masked)."""
    for i in range(3):
        (root / "good").mkdir(parents=True, exist_ok=True)
        Image.fromarray(part(100 + i)[0]).save(root / "good" / f"g{i}.png")
        img, mask = part(200 + i, spot=True)
        (root / "spot").mkdir(exist_ok=True)
        Image.fromarray(img).save(root / "spot" / f"s{i}.png")
        if masks:
            (root / "masks" / "spot").mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root / "masks" / "spot" / f"s{i}.png")
        (root / "dent").mkdir(exist_ok=True)
        Image.fromarray(part(300 + i, spot=True)[0]).save(root / "dent" / f"d{i}.jpg")
    return root


def test_a_nested_plain_folder_trains_and_stores_a_threshold(tmp_path, capsys):
    folder = plain_folder(tmp_path / "my_parts")
    D.main(["train", "--data", str(folder), "--out", str(tmp_path / "run"), "--holdout", "0.25"] + FLAGS)
    out = capsys.readouterr().out
    assert "training " + str(folder) + " (18 normal images, 6 held out for the threshold)" in out  # ceil(24 / 4)
    assert "no test split (a plain folder without --test): the threshold only" in out
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    t = ckpt["threshold"]
    assert t["n_held_out"] == 6 and t["quantile"] == 0.99 and t["eval_t"] == "100,200" and t["rule"] == "synthetic"
    assert t["n_synthetic"] == 24 and t["value"] == t["by_rule"]["synthetic"] >= t["floor"] - 1e-6  # 4 per image
    q = t["by_rule"]["quantile"]
    assert t["held_out_scores"]["min"] - 1e-6 <= q <= t["held_out_scores"]["max"] + 1e-6  # summary: 6 decimals
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["threshold"]["value"] == t["value"] and "image_auroc" not in m
    with pytest.raises(SystemExit, match="plain folder of normal images: it has no test split; pass --test"):
        D.main(["eval", "--run", str(tmp_path / "run")])


def test_a_folder_without_images_is_one_clear_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "readme.txt").write_text("")
    with pytest.raises(SystemExit) as e:  # a SystemExit with a message: one line on stderr, exit status 1, no
        D.main(["train", "--data", str(tmp_path / "empty")])  # traceback (tests/test_diffusionad.py, in a process)
    msg = str(e.value.code)
    assert len(msg.splitlines()) == 1 and msg.startswith(str(tmp_path / "empty"))
    assert "no image files (.bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp, any case) in it or its subfolders" in msg


def test_holdout_is_a_fixed_slice_of_at_least_five(tmp_path):
    ds = folders.open_data(plain_folder(tmp_path / "f", n=40), "train", 32)
    a_train, a_held = folders.holdout_split(ds, 0.1)
    b_train, b_held = folders.holdout_split(ds, 0.1)
    assert len(a_held) == 5 and len(a_train) == 35  # ceil(4) < 5: at least five
    assert [r[0] for r in a_held.records] == [r[0] for r in b_held.records]  # the same for every run and seed
    assert not {r[0] for r in a_held.records} & {r[0] for r in a_train.records}
    assert len(folders.holdout_split(ds, 0.5)[1]) == 20 and folders.holdout_split(ds, 0)[1] is None
    with pytest.raises(ValueError, match="too few to hold out 5"):
        folders.holdout_split(folders.Subset(ds, range(6)), 0.1)


@pytest.mark.parametrize("masks", [True, False])
def test_a_labelled_test_folder_with_and_without_masks(tmp_path, capsys, masks):
    folder, test = plain_folder(tmp_path / "parts"), labelled(tmp_path / "test", masks)
    D.main(["train", "--data", str(folder), "--test", str(test), "--out", str(tmp_path / "run")] + FLAGS)
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["n_test_good"] == 3 and m["n_test_anomalous"] == 6 and 0 <= m["image_auroc"] <= 1
    assert set(m["image_auroc_per_defect"]) == {"dent", "spot"}
    f = m["flagged"]
    assert f["threshold"] == m["threshold"]["value"] and 0 <= f["anomalous"] <= 1 and f["rule"] == "synthetic"
    assert f["image_f1_max"] == m["image_f1_max"] and 0 <= f["f1"] <= f["image_f1_max"] + 1e-12
    assert set(f["by_rule"]) == {"synthetic", "quantile"} and f["by_rule"]["synthetic"]["f1"] == f["f1"]
    assert "the stored threshold" in out and "(synthetic rule) flags" in out and "the quantile rule's threshold" in out
    if masks:  # pixel metrics over the good images and the three masked spots
        assert m["n_test_without_mask"] == 3 and 0 <= m["pixel_pro"] <= 1
        assert "pixel metrics and PRO over the 3 anomalous images with a mask (and the good ones); 3 have none" in out
    else:
        assert m["n_test_without_mask"] == 6 and m["pixel_auroc"] is None and m["pixel_pro"] is None
        assert "no masks for the anomalous test images: image metrics only" in out
    D.main(["eval", "--run", str(tmp_path / "run"), "--eval-t", "100"])  # the run's own --test again
    again = json.loads((tmp_path / "run" / "eval_ckpt_test_t100.json").read_text())
    assert (again["n_test_good"], again["n_test_anomalous"], again["n_test_without_mask"]) == \
        (3, 6, m["n_test_without_mask"]) and "flagged" not in again  # another t: the threshold does not apply
    with pytest.raises(SystemExit, match="is inside --data"):
        D.main(["train", "--data", str(tmp_path), "--test", str(test), "--out", str(tmp_path / "r2")] + FLAGS)


def test_the_threshold_rules_on_toy_cases():
    cfg, opts = D.Config(eval_t=(100, 200), top_k=50), RunOptions(threshold_quantile=0.9)
    t = thresholds.from_normals(np.arange(1, 11) / 10, cfg, opts)  # 0.1 ... 1.0
    assert t["value"] == pytest.approx(0.91) and t["n_held_out"] == 10 and t["rule"] == "quantile"  # numpy's linear
    assert t["held_out_scores"] == {"min": 0.1, "median": 0.55, "mean": 0.55, "max": 1.0}
    state = {"threshold": t}
    assert thresholds.stored(state, cfg, opts, "ck")[0] is t
    assert thresholds.stored(state, cfg, opts, "ck", 0.3) == (0.3, "--threshold")
    value, why = thresholds.stored(state, D.Config(eval_t=(200, 400)), opts, "ck")
    assert value is None and "paper inference at t = 100,200" in why  # a threshold belongs to its inference
    value, why = thresholds.stored(state, cfg, RunOptions(variant="authors"), "ck")
    assert value is None and "not this command's authors inference" in why
    assert thresholds.stored({}, cfg, opts, "ck")[0] is None
    # the F1 rule: separated classes are split in the middle of their gap, whatever their sizes
    assert thresholds.f1_midpoint([0.1, 0.2, 0.3], [0.7, 0.8]) == (pytest.approx(0.5), 1.0)
    value, f1 = thresholds.f1_midpoint([0.1, 0.2, 0.3, 0.6], [0.5, 0.7, 0.8, 0.9])  # overlap: one normal above one
    assert f1 == pytest.approx(8 / 9) and value == pytest.approx(0.4)  # flags the 4 anomalies and the 0.6
    weighted = thresholds.f1_midpoint([0.1, 0.2, 0.3, 0.6], [0.5, 0.7, 0.8, 0.9], normal_weight=4)
    assert weighted[0] == pytest.approx(0.65)  # a normal counted 4 times: the cut moves above it
    assert thresholds.f1_midpoint([0.2, 0.2], [0.2, 0.9])[0] == pytest.approx(0.55)  # a tie: the interval's middle
    labels, scores = np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.5, 0.9])
    v = thresholds.verdicts({"value": 0.55, "rule": "synthetic", "by_rule": {"quantile": 0.95}}, scores, labels, 0.8)
    assert (v["good"], v["anomalous"], v["f1"], v["image_f1_max"]) == (0.5, 0.5, 0.5, 0.8)
    assert v["by_rule"]["quantile"] == {"threshold": 0.95, "good": 0.0, "anomalous": 0.0, "f1": 0.0}


def trained_folder_run(tmp_path, holdout="0.25"):
    folder = plain_folder(tmp_path / "parts")
    D.main(["train", "--data", str(folder), "--out", str(tmp_path / "run"), "--holdout", holdout] + FLAGS)
    return tmp_path / "run"


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    """A run on a plain folder that holds out a quarter of it for the threshold (shared: predict and export)."""
    return trained_folder_run(tmp_path_factory.mktemp("folder"))


def test_predict_decides_by_the_checkpoints_threshold(folder_run, tmp_path, capsys):
    run = folder_run
    inputs = labelled(tmp_path / "new")
    threshold = torch.load(run / "ckpt.pt", weights_only=True)["threshold"]["value"]
    capsys.readouterr()
    D.main(["predict", "--run", str(run), str(inputs / "good"), str(inputs / "spot"), "--csv", str(tmp_path / "a.csv")])
    rows = [r.split(",") for r in (tmp_path / "a.csv").read_text().splitlines()]
    assert rows[0] == ["path", "score", "anomalous", "heatmap"] and len(rows) == 7
    assert all(r[2] == str(int(float(r[1]) >= threshold)) for r in rows[1:])
    flagged = sum(r[2] == "1" for r in rows[1:])
    assert f"{flagged} of 6 images flagged as anomalous (score >= threshold {threshold:.6f}, the F1 optimum between " \
        "6 held-out normal images and 24 synthetic anomalies made from them" in capsys.readouterr().out
    for value, expected in ((0.0, "1"), (2.0, "0")):  # --threshold overrides
        csv_path = tmp_path / f"t{value}.csv"
        D.main(["predict", "--run", str(run), str(inputs / "good"), "--csv", str(csv_path), "--threshold", str(value)])
        assert {r.split(",")[2] for r in csv_path.read_text().splitlines()[1:]} == {expected}


def test_predict_without_a_stored_threshold_leaves_the_verdict_empty(tmp_path, capsys):
    run = trained_folder_run(tmp_path, holdout="0")
    D.main(["predict", "--run", str(run), str(tmp_path / "parts" / "p000.png"), "--csv", str(tmp_path / "a.csv")])
    assert (tmp_path / "a.csv").read_text().splitlines()[1].split(",")[2] == ""
    assert "stores none (trained with --holdout 0 or by an earlier version); pass --threshold X" in capsys.readouterr().out


FRESH = """
import json, sys
import numpy as np, torch
from PIL import Image
program = torch.export.load(sys.argv[1]).module()
info = json.load(open(sys.argv[1][:-4] + ".json"))
size = (info["width"], info["height"])
x = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize(size, Image.BILINEAR),
                                             np.float32) / 255).permute(2, 0, 1) for p in sys.argv[2:]])
maps, scores = program(x)
ours = sorted(m for m in sys.modules if m in ("data", "diffusionad", "extras", "metrics"))
print(json.dumps({"scores": scores.tolist(), "maps": list(maps.shape), "ours": ours, "threshold": info["threshold"]}))
"""


def test_export_runs_in_a_fresh_process_and_equals_predict(folder_run, tmp_path):
    run = folder_run
    inputs = labelled(tmp_path / "new")
    files = sorted(str(p) for d in ("good", "spot", "dent") for p in (inputs / d).iterdir())  # 9: not a batch multiple
    D.main(["predict", "--run", str(run), *files, "--csv", str(tmp_path / "p.csv"), "--no-amp"])  # float32, as export
    predicted = {r.split(",")[0]: float(r.split(",")[1]) for r in (tmp_path / "p.csv").read_text().splitlines()[1:]}
    with pytest.raises(SystemExit, match="model.onnx: the file name must end in .pt2"):
        D.main(["export", "--run", str(run), "--out", str(tmp_path / "model.onnx")])
    D.main(["export", "--run", str(run), "--out", str(tmp_path / "model.pt2")])
    with pytest.raises(SystemExit, match="exists: pass a new file name"):  # refused before any work
        D.main(["export", "--run", str(run), "--out", str(tmp_path / "model.pt2")])
    (tmp_path / "fresh.py").write_text(textwrap.dedent(FRESH))
    r = subprocess.run([sys.executable, "-I", str(tmp_path / "fresh.py"), str(tmp_path / "model.pt2"), *files],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["ours"] == [] and got["maps"] == [9, 32, 32]  # torch alone; any batch size
    assert got["threshold"] == torch.load(run / "ckpt.pt", weights_only=True)["threshold"]["value"]
    assert np.allclose(got["scores"], [predicted[f] for f in files], atol=1e-4)


def test_a_run_of_the_authors_variant_evaluates_predicts_and_exports_alike(tmp_path):
    """train --variant authors on a plain folder (their batches, two denoiser passes, their guided inference): the
    stored threshold, predict's scores and the exported program's agree."""
    folder, inputs = plain_folder(tmp_path / "parts"), labelled(tmp_path / "new")
    run = tmp_path / "run"
    D.main(["train", "--variant", "authors", "--batch-size", "4", "--data", str(folder), "--out", str(run),
            "--holdout", "0.25"] + FLAGS)
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    assert ck["config"]["variant"] == "authors" and ck["config"]["eval_t"] == (200, 400)  # args1.json's
    assert ck["threshold"]["variant"] == "authors" and len(ck["optimizer"]["param_groups"]) == 2  # their two Adams
    files = sorted(str(p) for d in ("good", "spot") for p in (inputs / d).iterdir())
    D.main(["predict", "--run", str(run), *files, "--csv", str(tmp_path / "p.csv"), "--no-amp"])  # float32, as export
    rows = [r.split(",") for r in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    assert all(r[2] == str(int(float(r[1]) >= ck["threshold"]["value"])) for r in rows)  # the stored threshold
    model, cfg = D.load(run)  # export's program (its file: the test above)
    program = Alg2Program(model, cfg).eval().requires_grad_(False)
    exported = torch.export.export(program, (torch.rand(2, 3, 32, 32),),
                                   dynamic_shapes=({0: torch.export.Dim("batch", max=4096)},)).module()
    with torch.no_grad():
        scores = exported(torch.stack([folders.load_image(f, 32) for f in files]))[1].numpy()  # another batch size
    assert np.allclose(scores, [float(r[1]) for r in rows], atol=1e-4)


def test_a_cpu_user_of_a_large_model_is_told_before_the_first_step(tmp_path, capsys, monkeypatch):
    real = reports.cpu_note
    monkeypatch.setattr(reports, "cpu_note", lambda *a: real(*a, min_params=0))  # any model counts as large
    folder = plain_folder(tmp_path / "parts")
    D.main(["train", "--data", str(folder), "--holdout", "0", "--out", str(tmp_path / "a")] + FLAGS)
    out = capsys.readouterr().out
    note = out.index("note: a 0M-parameter model on a CPU: one step takes about")
    assert note < out.index("step 1/2") and "add --preset cpu" in out and "Continuing as asked" in out
    monkeypatch.undo()
    D.main(["train", "--data", str(folder), "--holdout", "0", "--out", str(tmp_path / "b")] + FLAGS)  # untold
    assert "note:" not in capsys.readouterr().out
    a, b = (torch.load(tmp_path / r / "ckpt.pt", weights_only=True) for r in "ab")
    assert all(torch.equal(a[n][k], b[n][k]) for n in ("denoiser", "seg") for k in a[n])  # the timing changed nothing


def elongated(root, n, shape=(40, 100), spot=False):
    """n parts of height x width with a bright bar; spot=True: a dark square in each (a defect) and its mask."""
    rng = np.random.default_rng(len(str(root)) + n)
    for i in range(n):
        img = (rng.random((*shape, 3)) * 40 + 90).astype(np.uint8)
        img[:, shape[1] // 2: shape[1] // 2 + 4] = 200
        mask = np.zeros(shape, np.uint8)
        if spot:
            img[5:12, 10 + 3 * i: 17 + 3 * i], mask[5:12, 10 + 3 * i: 17 + 3 * i] = 10, 255
        root.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"e{i:02d}.png")
        if spot:
            (root.parent / "masks" / root.name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(root.parent / "masks" / root.name / f"e{i:02d}.png")
    return root


def test_a_folder_of_elongated_parts_keeps_their_shape_from_training_to_export(tmp_path, capsys):
    """No --img-size: the short side at the preset's 64 px, the long one at the same aspect (40 x 100 -> 64 x 160);
    train, eval, predict and export all take that shape, and export's scores equal predict's."""
    folder, test = elongated(tmp_path / "parts", 20), tmp_path / "test"
    elongated(test / "good", 3), elongated(test / "spot", 3, spot=True)
    run, small = tmp_path / "run", [f for f in FLAGS[2:] if f not in ("--preset",)]
    D.main(["train", "--preset", "cpu", "--data", str(folder), "--test", str(test), "--out", str(run),
            "--holdout", "0.25", "--base-channels", "8", "--channel-mult", "1,2"] + small[2:])
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    assert ck["config"]["img_size"] == (64, 160) and json.loads((run / "config.json").read_text())["img_size"] == [64, 160]
    m = json.loads((run / "metrics.json").read_text())
    bf16 = speed.native_bf16(torch.device("cpu"))  # the preset infers in bf16 where the CPU has it natively
    assert m["precision"] == ck["threshold"]["precision"] == ("bf16" if bf16 else "float32")
    assert m["n_test_good"] == 3 and m["n_test_anomalous"] == 3 and 0 <= m["pixel_pro"] <= 1
    D.main(["eval", "--run", str(run), "--save-maps"])
    panel = Image.open(sorted((run / ("eval_ckpt_test_t100+200" + "_amp" * bf16)).glob("spot_*.png"))[0])
    assert panel.size == (4 * 160, 64)  # input | restoration | map | truth, each 64 x 160
    files = sorted(str(p) for p in (test / "spot").iterdir())
    D.main(["predict", "--run", str(run), *files, "--csv", str(tmp_path / "p.csv"), "--no-amp"])  # float32, as export
    rows = [r.split(",") for r in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    assert Image.open(rows[0][3]).size == (2 * 160, 64)  # input | heatmap
    D.main(["export", "--run", str(run), "--out", str(tmp_path / "model.pt2")])
    info = json.loads((tmp_path / "model.json").read_text())
    assert (info["height"], info["width"]) == (64, 160)
    images = torch.stack([folders.load_image(f, (64, 160)) for f in files])
    with torch.no_grad():
        maps, scores = torch.export.load(str(tmp_path / "model.pt2")).module()(images)
    assert maps.shape == (3, 64, 160) and np.allclose(scores.numpy(), [float(r[1]) for r in rows], atol=1e-4)
    Image.open(files[0]).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "turned.png")  # another aspect: said
    D.main(["predict", "--run", str(run), str(tmp_path / "turned.png"), files[0], "--csv", str(tmp_path / "q.csv")])
    out = capsys.readouterr().out
    assert "--preset cpu: images at 64,160 px (their median short side 40, 64-256), 64-px crops" in out
    assert ("scoring in bf16, the run's default on this device; --no-amp: float32" in out) == bf16
    assert ("note: the threshold was set on bf16 scores, these are float32" in out) == bf16  # the --no-amp one
    bf16_score = float((tmp_path / "q.csv").read_text().splitlines()[2].split(",")[1])  # files[0], as scored above
    assert abs(bf16_score - float(rows[0][1])) < 0.02 and (bf16_score != float(rows[0][1])) == bf16
    assert ck["aspects"] == [2.5, 2.5] or ck["aspects"] == (2.5, 2.5)  # the training images' width / height
    assert "note: 1 of 2 images have an aspect (width / height) outside the training images' 2.50-2.50, e.g. " \
        "turned.png (40 x 100): stretched to the run's 160 x 64" in out
    D.main(["train", "--data", str(folder), "--out", str(tmp_path / "hw"), "--holdout", "0"] + FLAGS[2:]
           + ["--img-size", "32,64", "--max-steps", "1"])  # explicit HEIGHT,WIDTH
    assert torch.load(tmp_path / "hw" / "ckpt.pt", weights_only=True)["config"]["img_size"] == (32, 64)
    D.main(["predict", "--ckpt", str(tmp_path / "hw" / "ckpt.pt"), str(tmp_path / "turned.png"), files[0]])
    assert "note: 1 of 2 images have an aspect" in capsys.readouterr().err  # stretched to 64 x 32, whatever the run


def test_images_of_several_shapes_and_sizes_the_unet_cannot_take_are_one_line(tmp_path):
    folder = elongated(tmp_path / "mixed", 6)
    Image.fromarray(np.full((80, 80, 3), 120, np.uint8)).save(folder / "square.png")
    with pytest.raises(SystemExit, match=r"mixed: its images have 2 different shapes at --img-size 64: 6 at 64x160 "
                                         r"\(e.g. e00.png\), 1 at 64x64 \(e.g. square.png\); pass --img-size HEIGHT,WIDTH"):
        D.main(["train", "--preset", "cpu", "--data", str(folder)])
    with pytest.raises(SystemExit, match=r"--img-size 100,250: every side must be a multiple of 32 .*the nearest that "
                                         r"can: 100 -> 96 or 128; 250 -> 224 or 256"):
        D.main(["train", "--data", str(folder), "--img-size", "100,250", "--channel-mult", "1,2"])
    D.main(["train", "--data", str(folder), "--img-size", "32", "--max-steps", "1", "--holdout", "0", "--out",
            str(tmp_path / "sq")] + FLAGS[2:])  # one side given: squares, as ever
    assert torch.load(tmp_path / "sq" / "ckpt.pt", weights_only=True)["config"]["img_size"] == 32


def test_a_labelled_calibration_folder_sets_the_threshold_and_never_the_test_split(tmp_path, capsys):
    folder, test, calib = plain_folder(tmp_path / "parts"), labelled(tmp_path / "test"), labelled(tmp_path / "calib")
    run = tmp_path / "run"
    D.main(["train", "--data", str(folder), "--test", str(test), "--calibrate", str(calib), "--out", str(run)] + FLAGS)
    t = torch.load(run / "ckpt.pt", weights_only=True)["threshold"]
    assert t["rule"] == "calibrate" and t["value"] == t["by_rule"]["calibrate"]
    assert t["calibration"] == {"folder": str(calib), "n_good": 3, "n_anomalous": 6, "f1": t["calibration"]["f1"]}
    assert {"synthetic", "quantile"} <= set(t["by_rule"])  # the held-out rules beside it, for the comparison
    assert f"the F1 optimum of 3 good and 6 anomalous images of {calib}" in capsys.readouterr().out
    assert json.loads((run / "metrics.json").read_text())["flagged"]["rule"] == "calibrate"
    (tmp_path / "nogood").mkdir()
    (tmp_path / "nogood" / "spot").symlink_to(calib / "spot")
    for bad, message in ((test, "it holds or is part of the test split"), (tmp_path / "nogood", "has no good/ folder"),
                         (tmp_path / "nowhere", "labelled folder .*nowhere does not exist")):
        with pytest.raises(SystemExit, match=f"--calibrate.*{message}"):
            D.main(["train", "--data", str(folder), "--test", str(test), "--calibrate", str(bad), "--out",
                    str(tmp_path / "bad")] + FLAGS)
        assert not (tmp_path / "bad").exists()  # before any work
