"""The data of DiffusionAD (Zhang et al., arXiv 2303.08730): the paper's anomaly synthesizer (Sec. 3.3, Fig. 4,
Eq. 9), the data sets the paper uses (MVTec AD's layout, VisA raw and 1cls, DAGM 2007) and Alg. 1's batches of
3 normal + 3 synthetic images.

An item is a dict: ``image`` float32 3xHxW in [0, 1] (as the authors' code trains), ``mask`` float32 1xHxW of 0/1,
``label`` 0/1, ``defect`` ("good" for normal images), ``path``. Our own options (other anomaly shapes, plain and
labelled folders, the built-in synthetic set, file checks, the held-out slice) are in extras/; README: Deviations.
"""
import csv
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch.utils.data import Dataset

IMG_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


# ============================================================================ the anomaly synthesizer (Sec. 3.3)
# Eq. (9): S = beta (M * N) + (1 - beta) (M * A) + (1 - M) * N. N: a normal image; M: a Perlin-noise mask inside the
# foreground F; A: the anomaly source, a texture (DTD) or N itself augmented and shuffled; beta ~ U[0.2, 0.8) (the
# authors' code). numpy alone: this section copies out as it is.
BETA_RANGE = (0.2, 0.8)
PERLIN_THRESHOLD = 0.5


def perlin(shape, res, rng, angle=0.0):
    """Gradient (Perlin) noise (H,W) with res = (ry, rx) cells across the image, rotated by angle; about +-1."""
    H, W = shape
    ys = (np.arange(H, dtype=np.float32)[:, None] + 0.5) / H - 0.5
    xs = (np.arange(W, dtype=np.float32)[None, :] + 0.5) / W - 0.5
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    py, px = (xs * s + ys * c) * np.float32(res[0]), (xs * c - ys * s) * np.float32(res[1])  # lattice units
    y0, x0 = np.floor(py), np.floor(px)
    fy, fx = py - y0, px - x0
    j, i = (y0 - y0.min()).astype(np.int32), (x0 - x0.min()).astype(np.int32)
    tx = int(i.max()) + 2
    theta = rng.uniform(0, 2 * np.pi, (int(j.max()) + 2) * tx)  # one random gradient per lattice point
    grads = np.stack([np.sin(theta), np.cos(theta)], 1).astype(np.float32).view(np.complex64).ravel()
    k = j * tx + i

    def dot(k, dy, dx):
        v = np.take(grads, k)
        return v.real * dy + v.imag * dx
    n00, n01 = dot(k, fy, fx), dot(k + 1, fy, fx - 1)
    n10, n11 = dot(k + tx, fy - 1, fx), dot(k + tx + 1, fy - 1, fx - 1)
    uy, ux = [t * t * t * (t * (t * 6 - 15) + 10) for t in (fy, fx)]  # fade curve
    top, bottom = n00 + ux * (n01 - n00), n10 + ux * (n11 - n10)
    return np.float32(math.sqrt(2)) * (top + uy * (bottom - top))  # scaled to about +-1


def perlin_mask(fg, rng, threshold=PERLIN_THRESHOLD):
    """M (H,W bool): Perlin noise with 2^a x 2^b cells (a, b ~ U{0..5} at 256 px, the authors' code; fewer below, so
    that a cell stays >= 8 px), rotated, above the threshold, inside the foreground fg. An empty M is redrawn; after
    10 tries it is the top 10 % of the noise inside fg."""
    H, W = fg.shape
    top = int(np.clip(np.log2(min(H, W) / 8), 0, 5))
    for _ in range(10):
        res = (2 ** int(rng.integers(0, top + 1)), 2 ** int(rng.integers(0, top + 1)))
        noise = perlin((H, W), res, rng, rng.uniform(-np.pi / 2, np.pi / 2))
        M = (noise > threshold) & fg
        if M.any():
            return M
    return fg & (noise >= np.quantile(noise[fg], 0.9))


def to_u8(x):
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def box3(x):
    """The 3x3 mean of each channel of x (H,W,C), edges mirrored: scipy.ndimage.uniform_filter(x, (3, 3, 1))."""
    for axis in (0, 1):  # a running sum along each axis in float64, as scipy
        p = np.moveaxis(np.pad(x.astype(np.float64), [(1, 1) if a == axis else (0, 0) for a in range(3)], "symmetric"),
                        axis, 0)
        sums = np.cumsum(np.concatenate([(p[0] + p[1] + p[2])[None], p[3:] - p[:-3]]), axis=0)
        x = np.moveaxis(sums / 3, 0, axis).astype(np.float32)
    return x


def equalize(x, rng):
    q, out = to_u8(x), np.empty_like(x)
    for c in range(3):
        cdf = np.cumsum(np.bincount(q[..., c].ravel(), minlength=256))
        lo = cdf[np.flatnonzero(cdf)[0]]
        lut = (cdf - lo) / max(cdf[-1] - lo, 1)
        out[..., c] = lut[q[..., c]] if cdf[-1] > lo else x[..., c]
    return out


def autocontrast(x, rng):
    q, cut, out = to_u8(x), rng.uniform(0, 0.1), np.empty_like(x)
    for c in range(3):
        cdf = np.cumsum(np.bincount(q[..., c].ravel(), minlength=256))
        lo, hi = np.searchsorted(cdf, [cut * cdf[-1], (1 - cut) * cdf[-1]]) / 255
        out[..., c] = np.clip((x[..., c] - lo) / max(hi - lo, 1 / 255), 0, 1)
    return out


AUGMENTATIONS = {  # the source's augmentations (strengths: README, Deviations)
    "equalize": equalize,
    "sharpness": lambda x, r: np.clip(x + r.uniform(0.5, 2.0) * (x - box3(x)), 0, 1),
    "autocontrast": autocontrast,
    "solarize": lambda x, r: np.where(x >= r.uniform(32, 128) / 255, 1 - x, x),
    "posterize": lambda x, r: (to_u8(x) & np.uint8((0xFF << (8 - int(r.integers(1, 5)))) & 0xFF)) / np.float32(255),
    "invert": lambda x, r: 1 - x,
    "gamma": lambda x, r: x ** r.uniform(0.5, 2.0, 3).astype(np.float32),
}


def augment(x, rng, n_ops=2):
    """n_ops distinct random augmentations in random order (two, Sec. 3.3)."""
    names = list(AUGMENTATIONS)
    for k in rng.choice(len(names), n_ops, replace=False):
        x = AUGMENTATIONS[names[k]](x, rng).astype(np.float32)
    return x


def shuffle_tiles(x, rng, grid=8):
    """Cut x (H,W,C) into grid x grid tiles and permute them (rows or columns beyond a multiple of grid stay)."""
    H, W, C = x.shape
    th, tw = H // grid, W // grid
    if th == 0 or tw == 0:
        return x
    out = x.copy()
    tiles = x[:grid * th, :grid * tw].reshape(grid, th, grid, tw, C).swapaxes(1, 2).reshape(-1, th, tw, C)
    tiles = tiles[rng.permutation(grid * grid)]
    out[:grid * th, :grid * tw] = tiles.reshape(grid, grid, th, tw, C).swapaxes(1, 2).reshape(grid * th, grid * tw, C)
    return out


def synthesize(N, fg, rng, texture=None, shape=None, fill=None, details=False):
    """Eq. (9) on a normal image N (H,W,3 float32 in [0, 1]) -> (S, M), S the synthetic image, M (H,W) its mask of
    0/1. fg: the foreground (H,W bool) or None (the whole image). texture: an anomaly source image (H,W,3), e.g. from
    DTD, augmented; None: self-augmentation, N augmented and cut into shuffled 8x8 tiles. details: (S, M, A, beta).
    Ours (extras/anomalies.py): shape(fg, rng) -> (M, soft M or None) or None (Perlin); fill(N, rng) -> (A, beta)."""
    N = np.asarray(N, np.float32)
    fg = np.ones(N.shape[:2], bool) if fg is None else np.asarray(fg, bool)
    if not fg.any():
        raise ValueError("synthesize: empty foreground mask")
    M, soft = (shape(fg, rng) if shape else None) or (perlin_mask(fg, rng), None)
    if fill is not None:
        A, beta = fill(N, rng)
    else:
        A = shuffle_tiles(augment(N, rng), rng) if texture is None else augment(np.asarray(texture, np.float32), rng)
        beta = float(rng.uniform(*BETA_RANGE))
    m = (M if soft is None else soft)[..., None].astype(np.float32)
    S = (beta * (m * N) + (1 - beta) * (m * A) + (1 - m) * N).astype(np.float32)  # Eq. (9)
    return (S, M.astype(np.float32), A, beta) if details else (S, M.astype(np.float32))


# ============================================================================ images and masks
def open_image(path):
    """A decoded PIL image; FileNotFoundError or ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        im = Image.open(path)
        im.load()  # decodes fully: a truncated file fails here
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError...
        raise ValueError(f"cannot read image {path}: {e}") from None
    return im


def hw(size):  # (height, width) of a size: S -> (S, S); (H, W) for images that are not square (ours)
    return (size, size) if isinstance(size, int) else tuple(size)


def rgb(im, size):
    """Any PIL mode -> float32 (H,W,3) in [0, 1] at size, bilinear (anti-aliased when shrinking); 16-bit / 65535."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float32)
        a = a / (65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0 if a.max() > 1 else 1.0)
        im = Image.fromarray(np.clip(a, 0, 1), "F")
    elif im.mode in ("1", "L", "LA"):
        im = im.convert("L")
    else:
        im = (im.convert("RGBA") if im.mode == "P" else im).convert("RGB")
    a = np.asarray(im.resize(hw(size)[::-1], Image.BILINEAR), dtype=np.float32)
    a = a / 255 if im.mode != "F" else a
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a


def nonzero(im):
    a = np.asarray(im)
    if a.ndim == 3:
        a = a[..., :3 if a.shape[2] >= 3 else 1].any(axis=2)  # alpha ignored
    return a != 0


def nearest(a, size):
    """Nearest-neighbour resize of a bool array to size (hw): each output pixel samples the pixel under its centre."""
    (H, W), (h, w) = hw(size), a.shape
    rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(int), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(int), w - 1)
    return a[rows][:, cols]


def at_half(im, size):
    """Bool (H,W) of a soft mask image: where it reaches half its range (>= 128 of 255) after a bilinear resize."""
    return np.asarray(im.convert("L").resize(hw(size)[::-1], Image.BILINEAR)) >= 128


def defect_mask(im, size):
    """A ground-truth mask at size (hw): non-zero pixels, resized nearest; a defect region (8-connected) that no
    output pixel samples keeps one pixel at its centre. Returns (float32 (H,W) of 0/1, how many regions kept so)."""
    a = nonzero(im)
    m = nearest(a, size)
    labels, n = ndimage.label(a, np.ones((3, 3), bool))
    lost = sorted(set(range(1, n + 1)) - set(np.unique(nearest(labels, size)).tolist())) if n else []
    H, W = hw(size)
    for cy, cx in ndimage.center_of_mass(a, labels, lost) if lost else []:
        m[min(int(cy * H / a.shape[0]), H - 1), min(int(cx * W / a.shape[1]), W - 1)] = True
    return m.astype(np.float32), len(lost)


def chw(a):
    """(H,W,C) array -> contiguous float32 (C,H,W) tensor."""
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32))


def make_item(img, mask, label, defect, path):
    return {"image": chw(img), "mask": torch.from_numpy(np.ascontiguousarray(mask[None], dtype=np.float32)),
            "label": int(label), "defect": defect, "path": str(path)}


def image_files(folder):
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTS) if folder.is_dir() else []


# ============================================================================ the data sets the paper uses
class ImageDataset(Dataset):
    """Records (image path, mask path or None, label, defect), read when an item is asked for."""

    def __init__(self, records, img_size, root, layout):
        self.records, self.img_size, self.root, self.layout = records, img_size, Path(root), layout
        self.name, self.category = self.root.parent.name or "data", self.root.name
        self.warned = False

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        path, mask_path, label, defect = self.records[i]
        im = open_image(path)
        mask, kept = np.zeros(hw(self.img_size), np.float32), 0
        if mask_path is not None:
            m = open_image(mask_path)
            if m.size != im.size and not self.warned:
                self.warned = True
                warnings.warn(f"mask {mask_path} is {m.size[0]}x{m.size[1]} but its image {path} is "
                              f"{im.size[0]}x{im.size[1]}; resizing (warned once per dataset)", stacklevel=2)
            mask, kept = defect_mask(m, self.img_size)
        return {**make_item(rgb(im, self.img_size), mask, label, defect, path), "regions_kept": kept,
                "has_mask": mask_path is not None or label == 0}


def mvtec(root, split):
    """MVTec AD's layout (also MPDD, BTAD, ...): CLASS/train/good/*, CLASS/test/<defect|good>/*,
    CLASS/ground_truth/<defect>/<stem>_mask.png; VisA 1cls: test/{good,bad}, ground_truth/bad/<stem>.png."""
    if split == "train":
        return [(p, None, 0, "good") for p in image_files(root / "train" / "good")]
    records, missing = [], []
    for d in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        gt = root / "ground_truth" / d.name  # <stem>_mask.png wins over <stem>.png
        masks = {m.stem.removesuffix("_mask"): m for m in sorted(image_files(gt), key=lambda p: p.stem.endswith("_mask"))}
        for p in image_files(d):
            if d.name != "good" and p.stem not in masks:
                missing.append(f"{p} has no mask: expected {gt / (p.stem + '_mask.png')} or {gt / (p.stem + '.png')}")
            else:
                records.append((p, None, 0, "good") if d.name == "good" else (p, masks[p.stem], 1, d.name))
    if missing:
        raise FileNotFoundError(f"{len(missing)} anomalous test image(s) without a mask: " + "; ".join(missing[:5])
                                + ("; ..." if len(missing) > 5 else ""))
    return records


def visa_raw(root, split):
    """The VisA release: ROOT/CLASS/Data/{Images,Masks}/..., split by ROOT/split_csv/1cls.csv."""
    csv_path = root.parent / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"{root} looks like the raw VisA release (Data/Images) but the split file "
                                f"{csv_path} is missing; copy split_csv/ from the VisA release next to {root.name}/")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"object", "split", "label", "image", "mask"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{csv_path}: expected columns object,split,label,image,mask, found {reader.fieldnames}")
        rows = [r for r in reader]
    mine = [r for r in rows if r["object"] == root.name]
    if not mine:
        raise ValueError(f"{csv_path} has no rows for class {root.name!r}; it has {sorted({r['object'] for r in rows})}")
    records = []
    for r in mine:
        label = 0 if r["label"] == "normal" else 1
        if r["split"] != split or (split == "train" and label):
            continue
        img, mask = root.parent / r["image"], (root.parent / r["mask"] if r["mask"] else None)
        if label and mask is None:
            raise ValueError(f"{csv_path}: anomalous image {r['image']} has no mask")
        for p in (img, mask):
            if p is not None and not p.is_file():
                raise FileNotFoundError(f"{csv_path} lists {p}, which does not exist")
        records.append((img, mask, label, "good" if label == 0 else r["label"]))
    return records


def dagm(root, split):
    """DAGM 2007: ClassN/{Train,Test}/NNNN.PNG, Label/Labels.txt (a header, then `id flag image 0 label-or-0`),
    Label/NNNN_label.PNG. Train: the Train images flagged 0 (unsupervised); test: every Test image."""
    sub = root / ("Train" if split == "train" else "Test")
    labels = sub / "Label" / "Labels.txt"
    if not labels.is_file():
        raise FileNotFoundError(f"DAGM layout: {labels} is missing")
    records, listed = [], set()
    for n, line in enumerate(labels.read_text().splitlines()[1:], start=2):
        f = line.split()
        if not f:
            continue
        if len(f) != 5 or f[1] not in ("0", "1"):
            raise ValueError(f"{labels}:{n}: expected 'id flag image 0 label-or-0', got {line!r}")
        img, defective = sub / f[2], int(f[1])
        listed.add(f[2])
        if not img.is_file():
            raise FileNotFoundError(f"{labels}:{n} lists {img}, which does not exist")
        mask = sub / "Label" / f[4] if defective else None
        if defective and (f[4] == "0" or not mask.is_file()):
            raise FileNotFoundError(f"defective DAGM image {img} has no mask ({labels}:{n} names {f[4]!r})")
        if not (split == "train" and defective):
            records.append((img, mask, defective, "defect" if defective else "good"))
    unlisted = sorted(p.name for p in image_files(sub) if p.name not in listed)
    if unlisted:
        raise ValueError(f"{sub}: {len(unlisted)} images not listed in {labels}, e.g. {unlisted[:3]}")
    return records


def open_layout(root):
    """The layout of a class folder by its files alone (None: not a class folder of these data sets)."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "visa-1cls" if (root / "test" / "bad").is_dir() else "mvtec"
    if (root / "Data" / "Images").is_dir():
        return "visa-raw"
    if any((root / s / "Label" / "Labels.txt").is_file() for s in ("Train", "Test")):
        return "dagm"
    return None


def open_dataset(path, split, img_size):
    """The train (normal images only) or test split of the class folder at path, in any of the layouts above."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(path).expanduser()
    if not root.is_dir():
        parent = root.parent
        if root.exists():
            raise ValueError(f"dataset path {root} is not a folder")
        if parent.is_dir() and str(parent) not in ("", "."):
            have = sorted(p.name for p in parent.iterdir() if p.is_dir())
            raise FileNotFoundError(f"class folder {root} does not exist; {parent} contains "
                                    + (", ".join(have[:30]) + (", ..." if len(have) > 30 else "") if have else "no folders"))
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    layout = open_layout(root)
    if layout is None:
        raise ValueError(f"{root}: not a class folder of MVTec AD's layout, VisA or DAGM 2007")
    records = {"mvtec": mvtec, "visa-1cls": mvtec, "visa-raw": visa_raw, "dagm": dagm}[layout](root, split)
    if not records:
        raise ValueError(f"empty {split} set: no images found in {root} ({layout} layout)")
    return ImageDataset(records, img_size, root, layout)


def foreground_folder(root):
    """Where a class keeps one foreground mask per training image: ours, CLASS/foreground/<stem>.* (non-zero), or the
    authors' DIS masks of objects, CLASS/DISthresh/good/<stem>.* (>= 128 of 255); None when it has neither."""
    return next((d for d in (root / "foreground", root / "DISthresh" / "good") if d.is_dir()), None)


class ForegroundFiles:
    """F of each training image from its file in foreground_folder; None where an image has none."""
    fixed = True  # the same F for an image at every epoch

    def __init__(self, folder, paths, size):
        self.folder, self.stems, self.size = Path(folder), [Path(p).stem for p in paths], size

    def __call__(self, i, image, rng):
        files = [p for p in sorted(self.folder.glob(self.stems[i] + ".*")) if p.suffix.lower() in IMG_EXTS]
        if not files:
            return None
        im = open_image(files[0])
        return nearest(nonzero(im), self.size) if self.folder.name == "foreground" else at_half(im, self.size)


class TextureParts:
    """The authors' foreground of texture classes: a random mask of CLASS/thresh/ (>= 128 of 255) at every draw."""
    fixed = False

    def __init__(self, files, size):
        self.files, self.size, self.read = list(files), size, {}

    def __call__(self, i, image, rng):
        k = int(rng.integers(len(self.files)))
        if k not in self.read:  # read once per worker, packed
            self.read[k] = np.packbits(at_half(open_image(self.files[k]), self.size))
        H, W = hw(self.size)
        return np.unpackbits(self.read[k], count=H * W).reshape(H, W).astype(bool)


# ============================================================================ Alg. 1's images and batches
class TrainSet(Dataset):
    """Alg. 1's images. Key (epoch, i, synthetic): normal image i as it is, or a synthetic anomaly made from it by
    synthesize with randomness from (seed, epoch, i) alone (the same batches for any number of loader workers).
    An item: image (3,H,W), mask (1,H,W; zero for a normal image), clean (the anomaly-free image N), label, path.
    foreground: F of image i, a callable (i, N, rng) -> (H,W) bool or None with an attribute `fixed` (the same F at
    every epoch: computed once); None or an empty F (< 0.5 %) is the whole image. textures: anomaly source images
    (DTD), used always when dtd_always (texture classes), else half of the time (the authors' code)."""

    def __init__(self, normal, seed=0, foreground=None, textures=(), dtd_always=False, shape=None, fill=None):
        self.normal, self.seed, self.foreground = normal, int(seed), foreground
        self.textures, self.dtd_always, self.shape, self.fill = list(textures), dtd_always, shape, fill
        self.cached, self.warned = {}, False

    def __len__(self):
        return len(self.normal)

    def foreground_of(self, i, N, rng):
        H, W = N.shape[:2]
        if self.foreground is not None and not self.foreground.fixed:
            return self.foreground(i, N, rng)
        if self.foreground is not None and i not in self.cached:
            fg = self.foreground(i, N, rng)
            why = "no foreground" if fg is None else "an empty foreground" if fg.mean() < 0.005 else ""
            self.cached[i] = None if why else np.packbits(fg)
            if why and not self.warned:
                self.warned = True
                warnings.warn(f"{why} for {self.normal[i]['path']}: using the whole image (warned once)", stacklevel=3)
        packed = self.cached.get(i)
        return np.ones((H, W), bool) if packed is None else np.unpackbits(packed, count=H * W).reshape(H, W).astype(bool)

    def sample(self, i, epoch=0):
        """Every part of synthetic image i of an epoch as numpy: image N, anomaly source A, foreground F, mask M,
        synthetic S."""
        i = int(i)
        rng = np.random.default_rng((self.seed, int(epoch), i))
        item = self.normal[i]
        N = item["image"].numpy().transpose(1, 2, 0)
        fg = self.foreground_of(i, N, rng)
        dtd = self.textures and (self.dtd_always or rng.random() < 0.5)
        tex = rgb(open_image(self.textures[rng.integers(len(self.textures))]), N.shape[0]) if dtd else None
        S, M, A, beta = synthesize(N, fg, rng, tex, self.shape, self.fill, details=True)
        return {"image": N, "anomaly": A, "foreground": fg, "mask": M, "synthetic": S, "beta": beta,
                "path": item["path"]}

    def __getitem__(self, key):
        """key: (epoch, index, synthetic)."""
        epoch, i, synthetic = key
        if not synthetic:
            item = self.normal[int(i)]
            return {"image": item["image"], "mask": torch.zeros_like(item["image"][:1]), "clean": item["image"],
                    "label": 0, "path": item["path"]}
        p = self.sample(i, epoch)
        return {"image": chw(p["synthetic"]), "mask": torch.from_numpy(p["mask"][None].copy()),
                "clean": chw(p["image"]), "label": 1, "path": p["path"]}


def epoch_batches(n_items, per_batch, seed, epoch):
    """The epoch's batches of item indices: a permutation seeded by (seed, epoch), so resumable. An epoch (ours; the
    paper does not define one) takes each image once."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    steps = n_items // per_batch
    return torch.randperm(n_items, generator=g)[: steps * per_batch].view(steps, per_batch).tolist()


def step_keys(indices, epoch):
    """TrainSet keys of one step's distinct images: the first half as they are, the second half synthetic (3 + 3,
    Sec. 4.2), each synthetic image made from another normal image than the step's normal ones."""
    half = len(indices) // 2
    return [(epoch, i, False) for i in indices[:half]] + [(epoch, i, True) for i in indices[half:]]


def epoch_steps(n_items, per_batch, seed, start, total, rank=0, world=1):
    """(epoch, this rank's item indices) of every step from start to total: each epoch's permutation cut into global
    batches of per_batch * world images, rank r taking the r-th part."""
    steps_per_epoch = n_items // (per_batch * world)
    batches = None
    for step in range(start, total):
        epoch, k = divmod(step, steps_per_epoch)
        if batches is None or k == 0:
            batches = epoch_batches(n_items, per_batch * world, seed, epoch)
        yield epoch, batches[k][rank * per_batch:(rank + 1) * per_batch]


def run_batches(n_items, per_batch, seed, start, total, rank=0, world=1):
    """TrainSet keys of this rank's share of every step from start to total, half normal, half synthetic: one pass
    feeds the whole run (a DataLoader's batch_sampler)."""
    for epoch, indices in epoch_steps(n_items, per_batch, seed, start, total, rank, world):
        yield step_keys(indices, epoch)
