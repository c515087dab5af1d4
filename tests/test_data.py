"""Tests for data.py and our data options (extras/anomalies.py, folders.py, checks.py, synthetic.py): every layout on
small trees built here, every bad-input error, the synthesizer's properties, TrainSet determinism, the built-in
synthetic set, the preview command, and the real data in ../shared/data (skipped when absent)."""
import csv
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

import data
import diffusionad as D
from extras import anomalies, checks, folders
from extras.authors import authors_batches
from extras.options import RunOptions

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def make_ts(normal, foreground="auto", seed=0, texture_dir="", shape="perlin", fill="blend"):
    """A run's TrainSet (extras/anomalies.trainset) of these options; its .kind: the foreground it resolved."""
    H, W = normal[0]["image"].shape[-2:]
    cfg = D.Config(img_size=H if H == W else (H, W), foreground=foreground, seed=seed, texture_dir=str(texture_dir))
    return anomalies.trainset(normal, cfg, RunOptions(anomaly_shape=shape, anomaly_fill=fill))


# ---------------------------------------------------------------- helpers: tiny trees in tmp_path
def save(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(np.asarray(arr)) if mode is None else Image.fromarray(np.asarray(arr)).convert(mode)
    im.save(path)
    return path


def gray(seed, size=64):
    return (np.random.default_rng(seed).random((size, size)) * 80 + 40).astype(np.uint8)


def with_square(seed, size=64):
    """A gray image with a white square at rows 16:32, cols 8:40, and its mask."""
    img, mask = gray(seed, size), np.zeros((size, size), np.uint8)
    img[16:32, 8:40], mask[16:32, 8:40] = 255, 255
    return img, mask


def make_mvtec(root, n_train=3, defect="crack", mask_name="{}_mask.png", good="good"):
    for i in range(n_train):
        save(root / "train" / "good" / f"{i:03d}.png", gray(i))
    for i in range(2):
        save(root / "test" / good / f"{i:03d}.png", gray(10 + i))
        img, mask = with_square(20 + i)
        save(root / "test" / defect / f"{i:03d}.png", img)
        save(root / "ground_truth" / defect / mask_name.format(f"{i:03d}"), mask)
    return root


def make_visa_raw(base, obj="pcb1"):
    rows = [["object", "split", "label", "image", "mask"]]
    for i in range(3):
        rows.append([obj, "train", "normal", f"{obj}/Data/Images/Normal/{i:04d}.JPG", ""])
        save(base / obj / "Data" / "Images" / "Normal" / f"{i:04d}.JPG", gray(i), "RGB")
    for i in range(3, 5):
        rows.append([obj, "test", "normal", f"{obj}/Data/Images/Normal/{i:04d}.JPG", ""])
        save(base / obj / "Data" / "Images" / "Normal" / f"{i:04d}.JPG", gray(i), "RGB")
    for i in range(2):
        img, mask = with_square(i)
        rows.append([obj, "test", "anomaly", f"{obj}/Data/Images/Anomaly/{i:03d}.JPG",
                     f"{obj}/Data/Masks/Anomaly/{i:03d}.png"])
        save(base / obj / "Data" / "Images" / "Anomaly" / f"{i:03d}.JPG", img, "RGB")
        save(base / obj / "Data" / "Masks" / "Anomaly" / f"{i:03d}.png", (mask > 0).astype(np.uint8) * 38)
    rows.append([obj, "train", "anomaly", rows[-1][3], rows[-1][4]])       # never trained on
    rows.append(["candle", "train", "normal", "candle/Data/Images/Normal/0000.JPG", ""])  # other class, absent
    (base / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(base / "split_csv" / "1cls.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return base / obj


def make_dagm(root):
    """Train: 0001, 0003 normal, 0002, 0004 defective; Test: 0005 normal, 0006, 0007 defective."""
    for sub, ids in (("Train", range(1, 5)), ("Test", range(5, 8))):
        lines = ["1"]                                            # the real header: just "1"
        for i in ids:
            defective = i in (2, 4, 6, 7)
            img, mask = with_square(i) if defective else (gray(i), None)
            save(root / sub / f"{i:04d}.PNG", img)
            if defective:
                save(root / sub / "Label" / f"{i:04d}_label.PNG", mask)
            lines.append("\t".join([str(i), str(int(defective)), f"{i:04d}.PNG", "0",
                                    f"{i:04d}_label.PNG" if defective else "0"]))
        (root / sub / "Label").mkdir(parents=True, exist_ok=True)
        (root / sub / "Label" / "Labels.txt").write_text("\n".join(lines) + "\n")
    return root


def expected_square(size):                                       # with_square's mask at img_size `size`
    m = np.zeros((size, size), np.float32)
    s = size / 64
    m[int(16 * s):int(32 * s), int(8 * s):int(40 * s)] = 1
    return m


# ---------------------------------------------------------------- layouts
def check_test_split(ds, n_good, n_bad, size=32):
    assert len(ds) == n_good + n_bad
    items = [ds[i] for i in range(len(ds))]
    assert sum(it["label"] for it in items) == n_bad
    for it in items:
        assert it["image"].shape == (3, size, size) and it["image"].dtype == torch.float32
        assert it["mask"].shape == (1, size, size) and set(it["mask"].unique().tolist()) <= {0.0, 1.0}
        assert 0 <= it["image"].min() and it["image"].max() <= 1
        if it["label"]:
            assert it["defect"] != "good"
            np.testing.assert_array_equal(it["mask"][0].numpy(), expected_square(size))
            assert it["image"][:, 9:15, 5:19].min() > 0.9        # the white square is under the mask
        else:
            assert it["defect"] == "good" and it["mask"].sum() == 0
    return items


def test_mvtec_layout(tmp_path):
    root = make_mvtec(tmp_path / "mvtec" / "widget")
    train = data.open_dataset(root, "train", 32)
    assert len(train) == 3 and train.layout == "mvtec" and (train.name, train.category) == ("mvtec", "widget")
    assert all(train[i]["label"] == 0 and train[i]["mask"].sum() == 0 for i in range(3))
    items = check_test_split(data.open_dataset(root, "test", 32), 2, 2)
    assert {it["defect"] for it in items} == {"good", "crack"}


def test_visa_1cls_layout(tmp_path):
    root = make_mvtec(tmp_path / "visa_pytorch" / "pcb1", defect="bad", mask_name="{}.png")
    assert data.open_dataset(root, "train", 32).layout == "visa-1cls"
    check_test_split(data.open_dataset(root, "test", 32), 2, 2)


def test_visa_raw_layout_with_csv(tmp_path):
    root = make_visa_raw(tmp_path / "VisA")
    train = data.open_dataset(root, "train", 32)
    assert len(train) == 3 and train.layout == "visa-raw"
    assert all("Normal" in train[i]["path"] for i in range(3))
    check_test_split(data.open_dataset(root, "test", 32), 2, 2)      # masks of value 38 count as defect


def test_dagm_layout_never_trains_on_defective(tmp_path):
    root = make_dagm(tmp_path / "dagm" / "Class1")
    train = data.open_dataset(root, "train", 32)
    assert sorted(Path(train[i]["path"]).name for i in range(len(train))) == ["0001.PNG", "0003.PNG"]
    assert train.layout == "dagm" and anomalies.foreground(train, "auto", 32)[0] == "texture"
    items = check_test_split(data.open_dataset(root, "test", 32), 1, 2)
    assert all(torch.equal(it["image"][0], it["image"][1]) for it in items)     # gray -> 3 equal channels


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16", "1", "LA"])
def test_any_pil_mode_and_size(tmp_path, mode):
    root = tmp_path / "c"
    arr = gray(0, 48)[:, :40]                                   # not square, not the target size
    if mode == "I;16":                                          # 16-bit PNG
        (root / "train" / "good").mkdir(parents=True)
        im = Image.fromarray(arr.astype(np.uint16) * 257)
        assert im.mode == "I;16"
        im.save(root / "train" / "good" / "a.png")
    else:
        save(root / "train" / "good" / "a.png", arr, mode)
    (root / "test" / "good").mkdir(parents=True)
    img = data.open_dataset(root, "train", 16)[0]["image"]
    assert img.shape == (3, 16, 16) and img.dtype == torch.float32 and 0 <= img.min() <= img.max() <= 1
    if mode not in ("RGBA", "RGB", "P"):
        assert torch.equal(img[0], img[2])
    if mode in ("L", "I;16", "RGB"):                           # 16-bit scaled by 65535 like 8-bit by 255
        assert abs(img.mean().item() - arr.mean() / 255) < 0.01


def test_load_image(tmp_path):
    t = folders.load_image(save(tmp_path / "x.jpg", gray(0, 30), "RGB"), 24)
    assert t.shape == (3, 24, 24) and t.dtype == torch.float32 and 0 <= t.min() <= t.max() <= 1
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        folders.load_image(tmp_path / "bad.png", 24)
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        folders.load_image(tmp_path / "nothere.png", 24)


# ---------------------------------------------------------------- bad input: clear errors naming the path
def test_missing_root_and_class(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.open_dataset(tmp_path / "nowhere" / "cls", "train", 32)
    make_mvtec(tmp_path / "mvtec" / "bottle")
    with pytest.raises(FileNotFoundError, match=r"(?s)bottel.*bottle"):       # says what exists
        data.open_dataset(tmp_path / "mvtec" / "bottel", "train", 32)


def test_unknown_layout_says_what_was_tried(tmp_path):
    (tmp_path / "weird" / "stuff").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"(?s)weird.*no known layout.*MVTec.*VisA.*DAGM"):
        folders.open_data(tmp_path / "weird", "train", 32)
    make_mvtec(tmp_path / "mvtec" / "bottle")
    with pytest.raises(ValueError, match=r"holds 1 classes \(bottle\); pass one class"):  # a root, not a class
        folders.open_data(tmp_path / "mvtec", "train", 32)
    with pytest.raises(ValueError, match="not a class folder of MVTec AD's layout, VisA or DAGM"):
        data.open_dataset(tmp_path / "weird", "train", 32)  # data.py alone reads the paper's data sets


def test_find_classes_of_each_benchmark_root(tmp_path):
    for name in ("bottle", "carpet"):
        make_mvtec(tmp_path / "mvtec" / name)
    (tmp_path / "mvtec" / "license_folder").mkdir()
    assert [p.name for p in folders.find_classes(tmp_path / "mvtec")] == ["bottle", "carpet"]
    assert folders.find_classes(tmp_path / "mvtec" / "bottle") == []                # a class is not a root
    for n in (10, 2, 1):
        make_dagm(tmp_path / "DAGM" / f"Class{n}")
    assert [p.name for p in folders.find_classes(tmp_path / "DAGM")] == ["Class1", "Class2", "Class10"]
    make_visa_raw(tmp_path / "VisA", "pcb1")
    make_visa_raw(tmp_path / "VisA2", "candle")                                # a second CSV, merged below
    rows = (tmp_path / "VisA2" / "split_csv" / "1cls.csv").read_text().splitlines()[1:]
    with open(tmp_path / "VisA" / "split_csv" / "1cls.csv", "a") as f:
        f.write("\n".join(rows) + "\n")
    shutil.copytree(tmp_path / "VisA2" / "candle", tmp_path / "VisA" / "candle")
    assert [p.name for p in folders.find_classes(tmp_path / "VisA")] == ["candle", "pcb1"]
    assert folders.find_classes(tmp_path / "nowhere") == []


def test_check_split_reports_every_problem_without_decoding(tmp_path):
    root = make_mvtec(tmp_path / "c", n_train=4)
    good = root / "train" / "good"
    big = save(tmp_path / "big.png", (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    (good / "000.png").write_bytes(big.read_bytes()[:-400])                   # truncated PNG
    (good / "001.png").write_bytes(b"\x89PNG garbage")                       # not an image
    jpg = save(tmp_path / "x.jpg", gray(0), "RGB")
    (good / "002.jpg").write_bytes(jpg.read_bytes()[:-100])                   # truncated JPEG
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "ground_truth" / "crack" / "001_mask.png")
    problems = checks.check_split(data.open_dataset(root, "train", 32))
    assert len(problems) == 3 and all(n in " ".join(problems) for n in ("000.png", "001.png", "002.jpg"))
    assert "truncated PNG" in problems[0] and "truncated JPEG" in problems[2]
    problems = checks.check_split(data.open_dataset(root, "test", 32))
    assert len(problems) == 1 and "001_mask.png: mask is 32x32 but its image is 64x64" in problems[0]
    assert checks.check_split(data.open_dataset(make_mvtec(tmp_path / "ok"), "test", 32)) == []
    assert checks.probe(good / "003.png") == (64, 64)


def test_every_missing_mask_is_named_at_once(tmp_path):
    root = make_mvtec(tmp_path / "c")
    for i in range(2):
        (root / "ground_truth" / "crack" / f"00{i}_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"(?s)2 anomalous test image\(s\) without a mask.*000.png.*001.png"):
        data.open_dataset(root, "test", 32)


def test_thin_defects_keep_a_pixel_after_resizing():
    m = np.zeros((512, 512), np.uint8)
    m[100:140, 301:303] = 255                     # a 2-px-wide scratch that nearest sampling at 64 px misses
    m[400:440, 200:240] = 255                     # a large defect: resized as before
    small, kept = data.defect_mask(Image.fromarray(m), 64)
    plain = np.asarray(Image.fromarray(m).resize((64, 64), Image.NEAREST)) > 0
    assert kept == 1 and small.sum() == plain.sum() + 1
    assert small[14, 37] == 1 and not plain[10:20, 35:40].any()             # its centre (119.5, 301.5) / 8
    np.testing.assert_array_equal(small[40:], plain[40:])
    same, kept = data.defect_mask(Image.fromarray(m), 512)
    assert kept == 0 and np.array_equal(same > 0, m > 0)


def test_empty_training_set(tmp_path):
    root = make_mvtec(tmp_path / "c", n_train=0)
    (root / "train" / "good").mkdir(parents=True, exist_ok=True)
    with pytest.raises(ValueError, match=r"empty train set.*c"):
        data.open_dataset(root, "train", 32)


def test_truncated_and_unreadable_images(tmp_path):
    root = make_mvtec(tmp_path / "c")
    good = root / "train" / "good" / "000.png"
    big = save(tmp_path / "big.png", (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    good.write_bytes(big.read_bytes()[:-400])                                  # truncated
    (root / "train" / "good" / "001.png").write_bytes(b"\x89PNG garbage")     # unreadable
    ds = data.open_dataset(root, "train", 32)
    for i, name in ((0, "000.png"), (1, "001.png")):
        with pytest.raises(ValueError, match=name):
            ds[i]


def test_anomalous_image_without_mask(tmp_path):
    root = make_mvtec(tmp_path / "c")
    (root / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"crack/001.png has no mask"):
        data.open_dataset(root, "test", 32)
    assert len(data.open_dataset(root, "train", 32)) == 3                      # training does not need masks


def test_mask_size_mismatch_warns_once_and_resizes(tmp_path):
    root = make_mvtec(tmp_path / "c")
    for i in range(2):                                           # masks at half resolution
        m = Image.open(root / "ground_truth" / "crack" / f"00{i}_mask.png").resize((32, 32), Image.NEAREST)
        m.save(root / "ground_truth" / "crack" / f"00{i}_mask.png")
    ds = data.open_dataset(root, "test", 32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        items = [ds[i] for i in range(len(ds))]
    assert len(w) == 1 and "000_mask.png" in str(w[0].message)
    for it in items:
        if it["label"]:
            np.testing.assert_array_equal(it["mask"][0].numpy(), expected_square(32))


def test_visa_csv_lists_missing_file_and_missing_csv(tmp_path):
    root = make_visa_raw(tmp_path / "VisA")
    (root / "Data" / "Masks" / "Anomaly" / "001.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1cls.csv lists .*001.png"):
        data.open_dataset(root, "test", 32)
    (tmp_path / "VisA" / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"split_csv/1cls.csv"):
        data.open_dataset(root, "train", 32)


def test_visa_csv_without_class_or_columns(tmp_path):
    root = make_visa_raw(tmp_path / "VisA", obj="pcb2")
    csv_path = tmp_path / "VisA" / "split_csv" / "1cls.csv"
    csv_path.write_text(csv_path.read_text().replace("pcb2,", "pcb9,"))
    with pytest.raises(ValueError, match=r"no rows for class 'pcb2'"):
        data.open_dataset(root, "train", 32)
    csv_path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="expected columns"):
        data.open_dataset(root, "train", 32)


def test_dagm_errors(tmp_path):
    root = make_dagm(tmp_path / "Class1")
    (root / "Test" / "Label" / "0006_label.PNG").unlink()
    with pytest.raises(FileNotFoundError, match="0006.PNG has no mask"):
        data.open_dataset(root, "test", 32)
    save(root / "Train" / "0099.PNG", gray(0))
    with pytest.raises(ValueError, match=r"not listed in .*Labels.txt.*0099.PNG"):
        data.open_dataset(root, "train", 32)
    (root / "Train" / "Label" / "Labels.txt").write_text("1\n1 0 0001.PNG\n")
    with pytest.raises(ValueError, match=r"Labels.txt:2"):
        data.open_dataset(root, "train", 32)


def test_bad_arguments(tmp_path):
    root = make_mvtec(tmp_path / "c")
    with pytest.raises(ValueError, match="split"):
        data.open_dataset(root, "val", 32)
    with pytest.raises(ValueError, match="variant"):
        folders.open_data("synthetic/nope", "train", 32)


# ---------------------------------------------------------------- the synthesizer (Sec. 3.3, Eq. 9)
def normal_image(size=64, seed=0):
    return np.random.default_rng(seed).random((size, size, 3)).astype(np.float32)


def disk(size=64, r=0.3):
    y, x = np.mgrid[:size, :size] / size
    return np.hypot(y - 0.5, x - 0.5) < r


def test_mask_binary_inside_foreground_and_outside_unchanged():
    N, F = normal_image(), disk()
    for seed in range(30):
        S, M = data.synthesize(N, F, np.random.default_rng(seed))
        assert S.dtype == np.float32 and S.shape == N.shape and M.shape == F.shape
        assert set(np.unique(M)) <= {0.0, 1.0} and M.sum() > 0
        assert not (M.astype(bool) & ~F).any()
        np.testing.assert_array_equal(S[M == 0], N[M == 0])      # exactly unchanged outside M
        assert 0 <= S.min() and S.max() <= 1


def test_eq9_and_beta_bounds():
    N = normal_image()
    for seed in range(20):
        S, M, A, beta = data.synthesize(N, None, np.random.default_rng(seed), details=True)
        assert 0.2 <= beta < 0.8
        m = M.astype(bool)
        np.testing.assert_allclose(S[m], beta * N[m] + (1 - beta) * A[m], atol=1e-6)
    source = normal_image(seed=5)
    S, M, A, beta = data.synthesize(N, None, np.random.default_rng(0), fill=lambda N, rng: (source, 0.3), details=True)
    m = M.astype(bool) & (np.abs(N - A).min(axis=2) > 0.2)
    assert m.any() and beta == 0.3 and A is source
    np.testing.assert_allclose(((S - A) / (N - A))[m], 0.3, atol=1e-4)


def test_default_beta_range_is_the_authors():
    assert data.BETA_RANGE == (0.2, 0.8) and data.PERLIN_THRESHOLD == 0.5  # beta ~ U[0.2, 0.8), authors' code
    betas = [data.synthesize(normal_image(16), None, np.random.default_rng(s), details=True)[3] for s in range(50)]
    assert 0.2 <= min(betas) < 0.25 and 0.75 < max(betas) < 0.8


def test_curve_masks_are_thin_strokes_and_mixed_uses_both():
    rng = np.random.default_rng(0)
    for size in (64, 256):
        for _ in range(20):
            M = anomalies.curves_mask(size, size, rng)
            assert M.any() and M.mean() < 0.03                       # thin: a few % of the image at most
            eroded = ndimage.binary_erosion(M, np.ones((5, 5), bool))
            assert not eroded.any()                                  # nowhere 5 px thick
    img = np.full((64, 64, 3), 0.5, np.float32)
    shapes = []
    for i in range(40):
        _, M = data.synthesize(img, None, np.random.default_rng(i), shape=anomalies.mixed)
        shapes.append(not ndimage.binary_erosion(M, np.ones((5, 5), bool)).any())
    assert 5 < sum(shapes) < 35                                      # both kinds occur
    a = data.synthesize(img, None, np.random.default_rng(1))                      # the paper's default...
    b = data.synthesize(img, None, np.random.default_rng(1), shape=anomalies.SHAPE["perlin"])     # ...is Perlin
    assert np.array_equal(a[1], b[1])
    with pytest.raises(SystemExit, match="--anomaly-shape must be one of perlin, curves, mixed, small"):
        D.main(["train", "--anomaly-shape", "blob"])


def test_same_seed_same_sample_different_seed_different():
    N, F = normal_image(), disk()
    a = data.synthesize(N, F, np.random.default_rng(7))
    b = data.synthesize(N, F, np.random.default_rng(7))
    c = data.synthesize(N, F, np.random.default_rng(8))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_empty_mask_is_redrawn_and_empty_foreground_refused():
    F = np.zeros((64, 64), bool)
    F[30, 30] = True                                             # one pixel: Perlin rarely hits it
    M = data.perlin_mask(F, np.random.default_rng(0), threshold=0.99)
    assert M.sum() == 1 and M[30, 30] == 1
    with pytest.raises(ValueError, match="empty foreground"):
        data.synthesize(normal_image(), np.zeros((64, 64), bool), np.random.default_rng(0))


def test_perlin_tiles_and_augmentations():
    rng = np.random.default_rng(0)
    noise = data.perlin((128, 96), (4, 8), rng, angle=0.4)
    assert noise.shape == (128, 96) and -1.5 < noise.min() < -0.2 and 0.2 < noise.max() < 1.5
    cover = [data.synthesize(normal_image(), None, np.random.default_rng(s))[1].mean() for s in range(40)]
    assert 0.02 < np.mean(cover) < 0.15                           # Perlin blobs cover ~5 % on average
    x = normal_image()
    t = data.shuffle_tiles(x, rng)
    tiles = lambda a: sorted(a.reshape(8, 8, 8, 8, 3).swapaxes(1, 2).reshape(64, -1).tolist())
    assert not np.array_equal(t, x) and tiles(t) == tiles(x)    # a permutation of the 8x8 tiles
    assert len(data.AUGMENTATIONS) == 7
    for name, op in data.AUGMENTATIONS.items():
        y = op(x, rng)
        assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1, name
    for shape in ((64, 64, 3), (37, 120, 3), (3, 5, 3)):  # the numpy box filter is scipy's, bit for bit
        x = rng.random(shape, dtype=np.float32) ** np.float32(1.7)
        assert np.array_equal(data.box3(x), ndimage.uniform_filter(x, (3, 3, 1)))


# ---------------------------------------------------------------- TrainSet
def test_trainset_items_and_determinism():
    normal = folders.open_data("synthetic", "train", 32)
    ts = make_ts(normal, seed=3)
    it, plain = ts[(0, 5, True)], ts[(0, 5, False)]
    assert set(it) == set(plain) == {"image", "mask", "clean", "label", "path"}
    assert it["image"].shape == it["clean"].shape == (3, 32, 32) and it["mask"].shape == (1, 32, 32)
    assert torch.equal(it["clean"], normal[5]["image"]) and it["mask"].sum() > 0  # made from image 5
    assert not torch.equal(it["image"], normal[5]["image"])
    assert torch.equal(plain["image"], normal[5]["image"]) and torch.equal(plain["clean"], plain["image"])
    assert plain["mask"].sum() == 0
    again = make_ts(folders.open_data("synthetic", "train", 32), seed=3)[(0, 5, True)]
    assert torch.equal(it["image"], again["image"])
    assert np.array_equal(ts.sample(5)["synthetic"], it["image"].numpy().transpose(1, 2, 0))
    assert not torch.equal(ts[(1, 5, True)]["image"], it["image"])
    assert not torch.equal(make_ts(normal, seed=4)[(0, 5, True)]["image"], it["image"])
    plain_ts = data.TrainSet(normal, seed=3)  # data.py alone: the whole image as the foreground, self-augmentation
    assert plain_ts.sample(5)["foreground"].all() and plain_ts[(0, 5, True)]["mask"].sum() > 0


def test_a_step_takes_distinct_images_half_normal_half_synthetic():
    keys = list(data.run_batches(30, 6, seed=0, start=0, total=12))  # 5 steps per epoch
    for step in keys:
        assert [k[2] for k in step] == [False] * 3 + [True] * 3  # 3 normal, then 3 synthetic
        assert len({k[1] for k in step}) == 6  # the synthetic ones are made from other images (authors' code)
    for e in (0, 1):
        epoch = [k[1] for step in keys[5 * e: 5 * e + 5] for k in step]
        assert sorted(epoch) == list(range(30)) and {k[0] for step in keys[5 * e: 5 * e + 5] for k in step} == {e}
    ranks = [list(data.run_batches(30, 6, 0, 0, 2, rank=r, world=2)) for r in (0, 1)]
    assert not {k[1] for s in ranks[0] for k in s} & {k[1] for s in ranks[1] for k in s}  # 2 steps of 12 images


def test_the_authors_batches_take_each_image_once_per_epoch_by_a_coin_and_are_resumable():
    keys = list(authors_batches(160, 16, seed=0, start=0, total=20))  # 10 steps per epoch
    for e in (0, 1):  # every image once per epoch, each normal or synthetic by its own coin
        epoch = [k for step in keys[10 * e: 10 * e + 10] for k in step]
        assert sorted(k[1] for k in epoch) == list(range(160)) and {k[0] for k in epoch} == {e}
        assert 50 < sum(k[2] for k in epoch) < 110  # about half synthetic (p = 1/2), not a fixed split per step
    assert len({tuple(k[2] for k in step) for step in keys}) > 10
    assert list(authors_batches(160, 16, 0, 7, 20)) == keys[7:]  # a resumed run draws the same
    assert list(authors_batches(160, 16, 1, 0, 20)) != keys


def test_trainset_same_batches_for_any_number_of_workers():
    ts = make_ts(folders.open_data("synthetic", "train", 32), seed=1)
    batches = [data.step_keys(b, 2) for b in ([0, 7, 9, 11, 12, 13], [3, 4, 5, 14, 15, 16], [100, 1, 2, 6, 8, 10])]
    runs = [list(torch.utils.data.DataLoader(ts, batch_sampler=batches, num_workers=w)) for w in (0, 2)]
    for a, b in zip(*runs):
        assert a["image"].shape == (6, 3, 32, 32)                # 3 normal + 3 synthetic per step
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
        assert a["mask"][:3].sum() == 0 and (a["mask"][3:].flatten(1).sum(1) > 0).all()


def test_foreground_auto_rules(tmp_path):
    make_mvtec(tmp_path / "mvtec" / "carpet")
    make_mvtec(tmp_path / "mvtec" / "bottle")
    assert make_ts(data.open_dataset(tmp_path / "mvtec" / "carpet", "train", 32)).kind == "texture"
    assert make_ts(data.open_dataset(tmp_path / "mvtec" / "bottle", "train", 32)).kind == "object"
    ds = data.open_dataset(tmp_path / "mvtec" / "bottle", "train", 32)
    assert make_ts(ds, foreground="none").kind == "none" and make_ts(ds, foreground="none").foreground is None
    assert make_ts(ds, foreground="texture").kind == "texture"                     # the flag wins
    obj = tmp_path / "unknown"                                   # an estimate: plain border + a blob
    for i in range(4):
        img = np.full((64, 64, 3), 30, np.uint8)
        img[disk(64, 0.2 + 0.02 * i)] = (200, 180, 60)
        save(obj / "train" / "good" / f"{i}.png", img)
    (obj / "test" / "good").mkdir(parents=True)
    assert make_ts(data.open_dataset(obj, "train", 32)).kind == "object"
    assert make_ts(data.open_dataset(tmp_path / "mvtec" / "carpet", "train", 32), foreground="object").kind == "object"
    with pytest.raises(ValueError, match="foreground"):
        make_ts(ds, foreground="mask")                           # no CLASS/foreground folder


def test_texture_foreground_is_a_rectangle():
    ts = make_ts(folders.open_data("synthetic", "train", 32), foreground="texture")
    sizes = set()
    for i in range(8):
        F = ts.sample(i)["foreground"]
        ys, xs = np.nonzero(F)
        assert F.sum() == (np.ptp(ys) + 1) * (np.ptp(xs) + 1) and F.sum() >= 16 * 16
        assert not (ts.sample(i)["mask"].astype(bool) & ~F).any()
        sizes.add((ys.min(), xs.min(), int(F.sum())))
    assert len(sizes) == 8 and min(s[2] for s in sizes) < 32 * 32    # random parts, not the whole image


def test_foreground_folder_is_used_and_missing_file_falls_back(tmp_path):
    root = make_mvtec(tmp_path / "c")
    left = np.zeros((64, 64), np.uint8)
    left[:, :32] = 255
    for i in range(2):                                           # image 002 has no foreground file
        save(root / "foreground" / f"{i:03d}.png", left)
    ts = make_ts(data.open_dataset(root, "train", 32), seed=0)
    assert ts.kind == "mask"
    for i in range(2):
        for e in range(3):
            m = ts[(e, i, True)]["mask"]
            assert m[0, :, 16:].sum() == 0 and m.sum() > 0
    with pytest.warns(UserWarning, match="no foreground for .*002.png: using the whole image"):
        assert ts[(0, 2, True)]["mask"].sum() > 0


def test_failing_foreground_estimate_falls_back_and_warns_once(tmp_path):
    root = tmp_path / "blank"
    for i in range(4):
        save(root / "train" / "good" / f"{i}.png", np.full((32, 32), 128, np.uint8))
    (root / "test" / "good").mkdir(parents=True)
    ts = make_ts(data.open_dataset(root, "train", 32), foreground="object")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for e in range(2):
            assert all(ts[(e, i, True)]["mask"].sum() > 0 for i in range(4))
    assert len(w) == 1 and "whole image" in str(w[0].message)


def test_the_authors_foreground_folders_are_read_as_they_are(tmp_path):
    obj = make_mvtec(tmp_path / "mvtec" / "bottle")
    soft = np.zeros((64, 64), np.uint8)
    soft[:, :32], soft[:, 32:40] = 255, 100                     # a DIS mask: soft edge below half its range
    for i in range(3):
        save(obj / "DISthresh" / "good" / f"{i:03d}.png", soft)  # CLASS/DISthresh/good/<stem>.png
    ts = make_ts(data.open_dataset(obj, "train", 32), seed=0)
    assert ts.kind == "mask"
    for i in range(3):
        F = ts.sample(i)["foreground"]
        assert F[:, :16].all() and not F[:, 16:].any() and not (ts.sample(i)["mask"].astype(bool) & ~F).any()
    tex = make_mvtec(tmp_path / "mvtec" / "carpet")
    parts = []
    for k, x in enumerate((0, 16, 32)):                          # CLASS/thresh/: random parts of the image
        m = np.zeros((64, 64), np.uint8)
        m[x:x + 32] = 255
        parts.append(save(tex / "thresh" / f"{k:03d}.png", m))
    ts = make_ts(data.open_dataset(tex, "train", 32), seed=0)
    seen = set()
    for e in range(12):
        F = ts.sample(e % 3, e)["foreground"]
        rows = np.nonzero(F.any(1))[0]
        assert F.sum() == 16 * 32 and rows.max() - rows.min() == 15
        seen.add(int(rows.min()))
    assert seen == {0, 8, 16}                                    # each of the three files, none invented
    assert make_ts(data.open_dataset(make_mvtec(tmp_path / "mvtec" / "zipper"), "train", 32)).kind \
        == "texture"                                             # zipper is a texture in the authors' code


def test_texture_classes_take_dtd_objects_half_of_the_time_and_dtd_is_not_tile_shuffled(tmp_path):
    ramp_x = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    for i in range(4):
        save(tmp_path / "dtd" / f"t{i}.png", ramp_x.T.copy())     # textures vary along y only
    for kind in ("carpet", "bottle"):
        for i in range(8):
            save(tmp_path / kind / "train" / "good" / f"{i}.png", ramp_x)  # images vary along x only
        (tmp_path / kind / "test" / "good").mkdir(parents=True)
    sources = {}
    for kind in ("carpet", "bottle"):
        ts = make_ts(folders.open_data(tmp_path / kind, "train", 64), texture_dir=tmp_path / "dtd")
        A = [ts.sample(i, e)["anomaly"][..., 0] for e in range(6) for i in range(8)]
        dtd = [np.ptp(a, axis=1).max() < 1e-5 for a in A]       # constant along x: a texture, as it is
        assert all(d or np.ptp(a, axis=0).max() > 0.05 for a, d in zip(A, dtd))  # else tiles broke the x ramp
        sources[kind] = sum(dtd) / len(A)
    assert sources["carpet"] == 1.0 and 0.3 < sources["bottle"] < 0.7  # textures: DTD only; objects: 50/50


def test_texture_dir(tmp_path):
    for i in range(2):
        save(tmp_path / "dtd" / "sub" / f"t{i}.jpg", (np.random.default_rng(i).random((40, 50, 3)) * 255).astype(np.uint8))
    normal = folders.open_data("synthetic", "train", 32)
    p = make_ts(normal, texture_dir=tmp_path / "dtd").sample(0)
    q = make_ts(normal).sample(0)
    assert p["anomaly"].shape == (32, 32, 3) and not np.allclose(p["anomaly"], q["anomaly"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        make_ts(normal, texture_dir=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nope"):
        make_ts(normal, texture_dir=tmp_path / "nope")


# ---------------------------------------------------------------- the built-in synthetic set
@pytest.mark.parametrize("variant", ["texture", "object"])
def test_synthetic_set(variant):
    t0 = time.time()
    train = folders.open_data(f"synthetic/{variant}", "train", 64)
    test = folders.open_data(f"synthetic/{variant}", "test", 64)
    tr, te = [train[i] for i in range(len(train))], [test[i] for i in range(len(test))]
    assert time.time() - t0 < 5                                  # all 260 images, generated in memory
    assert len(tr) == 200 and len(te) == 60 and sum(it["label"] for it in te) == 30
    assert all(it["label"] == 0 and it["mask"].sum() == 0 for it in tr)
    for it in te:
        assert (it["mask"].sum() > 0) == bool(it["label"]) and (it["defect"] == "good") == (not it["label"])
    assert {it["defect"] for it in te} == {"good", "scratch", "spot", "missing", "stain"}
    other = folders.open_data(f"synthetic/{variant}", "test", 64)
    assert all(torch.equal(te[i]["image"], other[i]["image"]) for i in range(0, 60, 7))     # deterministic
    imgs = torch.stack([it["image"] for it in tr])
    assert imgs.std(0).mean() > 0.02                             # normal images vary...
    assert not torch.equal(tr[0]["image"], te[0]["image"])       # ...and test normals are new ones
    if variant == "object":                                      # anomalies only on the object
        for i in range(30, 60):
            assert not (test[i]["mask"][0].numpy().astype(bool) & ~test.foreground_mask(i)).any()
    assert folders.open_data("synthetic", "train", 64).category == "texture"


def test_synthetic_anomalies_change_every_masked_pixel():
    """Exact masks: an anomaly's pixels differ from the good texture around them."""
    test = folders.open_data("synthetic", "test", 64)
    for i in range(30, 60):
        it = test[i]
        m, img = it["mask"][0].bool(), it["image"]
        grown = torch.from_numpy(ndimage.binary_dilation(m.numpy(), iterations=2))
        ring = img[:, grown & ~m].mean(1)
        inside = img[:, m].mean(1)
        assert (inside - ring).abs().max() > 0.1, it["defect"]


# ---------------------------------------------------------------- preview
def test_preview_cli(tmp_path, capsys):
    out = tmp_path / "grid.png"
    D.main(["preview", "--data", "synthetic", "--out", str(out), "--n", "3", "--img-size", "32"])
    assert Image.open(out).size == (4 * 32 + 3 * 4, 3 * 32 + 2 * 4)
    assert "N | A | M | S" in capsys.readouterr().out
    D.main(["preview", "--data", str(make_mvtec(tmp_path / "toy")), "--out", str(out), "--n", "2", "--img-size",
            "32,48"])  # HEIGHT,WIDTH
    assert Image.open(out).size == (4 * 48 + 3 * 4, 2 * 32 + 4)


def test_resize_makes_a_copy_that_loads_to_the_same_pixels_at_any_shape(tmp_path, capsys):
    src = make_mvtec(tmp_path / "toy")
    D.main(["resize", "--data", str(src), "--out", str(tmp_path / "copy"), "--img-size", "32,48"])
    assert "mvtec layout at 32,48 px" in capsys.readouterr().out
    for split in ("train", "test"):
        a, b = data.open_dataset(src, split, (32, 48)), data.open_dataset(tmp_path / "copy", split, (32, 48))
        for i in range(len(a)):
            assert a[i]["image"].shape == (3, 32, 48)
            assert (a[i]["image"] - b[i]["image"]).abs().max() <= 1 / 255 + 1e-6  # stored as 8-bit PNG
            assert torch.equal(a[i]["mask"], b[i]["mask"])


# ---------------------------------------------------------------- real data in ../shared/data
def need(path):
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path


def test_real_dagm_class8():
    root = need(SHARED / "dagm" / "Class8")
    flagged = {line.split()[2] for line in (root / "Train" / "Label" / "Labels.txt").read_text().splitlines()[1:]
               if line.split() and line.split()[1] == "1"}
    train, test = data.open_dataset(root, "train", 64), data.open_dataset(root, "test", 64)
    assert len(flagged) == 25 and len(train) == 250 and len(test) == 225
    assert not {Path(r[0]).name for r in train.records} & flagged
    assert sum(r[2] for r in test.records) == 100
    for i in range(0, len(test), 15):
        it = test[i]
        assert it["image"].shape == (3, 64, 64) and torch.equal(it["image"][0], it["image"][2])
        assert (it["mask"].sum() > 0) == bool(it["label"])
    assert make_ts(train).kind == "texture"


def test_real_magnetic_tile():
    root = need(SHARED / "magnetic_tile")
    train, test = data.open_dataset(root, "train", 64), data.open_dataset(root, "test", 64)
    assert len(train) == 762 and len(test) == 582 and sum(r[2] for r in test.records) == 392
    sizes = {Image.open(r[0]).size for r in train.records[:20]}
    assert len(sizes) > 1 and all(train[i]["image"].shape == (3, 64, 64) for i in range(0, 20, 4))
    i = next(k for k, r in enumerate(test.records) if r[3] == "blowhole")
    gt = np.asarray(Image.open(test.records[i][1]).resize((64, 64), Image.NEAREST)) > 0
    np.testing.assert_array_equal(test[i]["mask"][0].numpy().astype(bool), gt)
    assert make_ts(train).kind == "texture"                      # the automatic estimate: no plain border


def test_real_visa_csv(tmp_path):
    real = need(SHARED / "visa_split_csv" / "1cls.csv")
    (tmp_path / "split_csv").mkdir()
    shutil.copy(real, tmp_path / "split_csv" / "1cls.csv")
    rows = [r for r in csv.DictReader(open(real)) if r["object"] == "cashew"]
    for r in rows:                                               # empty stand-ins for the release's files
        for p in (r["image"], r["mask"]):
            if p:
                (tmp_path / p).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / p).touch()
    train, test = data.open_dataset(tmp_path / "cashew", "train", 32), data.open_dataset(tmp_path / "cashew", "test", 32)
    assert (len(train), len(test), sum(r[2] for r in test.records)) == (450, 150, 100)
    assert anomalies.foreground(train, "auto", 32)[0] == "object"
    (tmp_path / rows[-1]["image"]).unlink()
    with pytest.raises(FileNotFoundError, match=rows[-1]["image"]):
        data.open_dataset(tmp_path / "cashew", "test", 32)


def test_small_marks_are_pcb_sized_soft_edged_and_invert_gives_the_other_material():
    rng = np.random.default_rng(0)
    for size in (64, 256):
        for _ in range(30):
            soft = anomalies.small_mask(size, size, rng)
            M = soft >= 0.5
            lab, n = ndimage.label(soft > 0, np.ones((3, 3), bool))
            assert 1 <= n <= 4 and M.mean() < 0.01                          # a few small marks
            sides = [max(s.stop - s.start for s in sl) for sl in ndimage.find_objects(lab)]
            assert max(sides) <= 0.08 * size + 4                              # at most ~24 px at 256
            assert ((soft > 0) & (soft < 1)).any()                            # anti-aliased edges
    hard = anomalies.small_mask(64, 64, np.random.default_rng(1), k=1)
    assert set(np.unique(hard)) <= {0.0, 1.0} and hard.any()
    board = (np.random.default_rng(1).random((64, 64)) > 0.5).astype(np.float32)  # a binarised image
    board = np.repeat(board[..., None], 3, axis=2)
    for i in range(10):
        S, M = data.synthesize(board, None, np.random.default_rng(i), shape=anomalies.small, fill=anomalies.invert)
        m = M.astype(bool)
        assert (np.abs(S - board)[m] >= 0.5).all()                  # towards the other material, at least half
        change = np.abs(S - board).max(axis=2)
        assert np.array_equal(change >= 0.5, m)                     # M: exactly the pixels that changed by half or more
        assert ((change > 0) & (change < 0.5)).any()                # a soft rim around the marks, unlabelled
    a = data.synthesize(board, None, np.random.default_rng(3))                          # the paper's default ...
    b = data.synthesize(board, None, np.random.default_rng(3), shape=anomalies.SHAPE["perlin"],
                        fill=anomalies.FILL["blend"])  # ... is unchanged
    assert np.array_equal(a[0], b[0])
    with pytest.raises(SystemExit, match="--anomaly-fill must be one of blend, invert"):
        D.main(["train", "--anomaly-fill", "paint"])
    ts = make_ts(folders.open_data("synthetic", "train", 32), shape="small", fill="invert")
    s = ts.sample(0)
    assert (np.abs(s["synthetic"] - s["image"])[s["mask"] > 0] >= 0.5 * np.abs(1 - 2 * s["image"])[s["mask"] > 0]).all()


def test_images_that_are_not_square_are_read_and_synthesized_at_height_by_width(tmp_path):
    root = make_mvtec(tmp_path / "mvtec" / "carpet")
    for k in range(2):  # the authors' thresh/ parts, read at (32, 64) too
        save(root / "thresh" / f"{k}.png", np.full((64, 64), 255, np.uint8))
    train, test = data.open_dataset(root, "train", (32, 64)), data.open_dataset(root, "test", (32, 64))
    it = test[[r[2] for r in test.records].index(1)]
    assert train[0]["image"].shape == (3, 32, 64) and it["mask"].shape == (1, 32, 64)
    m = np.zeros((32, 64), np.float32)
    m[8:16, 8:40] = 1  # with_square's mask (rows 16:32, cols 8:40 of 64 x 64) at half the height
    np.testing.assert_array_equal(it["mask"][0].numpy(), m)
    small, kept = data.defect_mask(Image.fromarray(np.pad(np.full((1, 2), 255, np.uint8), ((300, 211), (100, 410)))), (32, 64))
    assert kept == 1 and small.sum() == 1 and small[18, 12] == 1  # a 1 x 2 px defect keeps its pixel
    for shape, fill in (("perlin", "blend"), ("mixed", "blend"), ("small", "invert")):
        ts = make_ts(train, shape=shape, fill=fill)
        s = ts.sample(1, 3)
        assert ts.kind == "texture" and s["synthetic"].shape == (32, 64, 3) and s["mask"].shape == (32, 64)
        assert s["mask"].any() and not (s["mask"].astype(bool) & ~s["foreground"]).any()
    noise = __import__("extras.inference", fromlist=["x"]).inference_noise(0, 2, (32, 64))
    assert noise.shape == (2, 3, 32, 64)
