"""Datasets and the anomaly synthesizer of DiffusionAD (paper Sec. 3.3, Fig. 4, Eq. 9).

``open_dataset(ROOT/CLASS, split, img_size)`` detects the layout:
* MVTec AD (also MPDD, BTAD, magnetic tile...): ``CLASS/train/good/*``, ``CLASS/test/<defect|good>/*``,
  ``CLASS/ground_truth/<defect>/<stem>_mask.png``. VisA "1cls" (prepared): the same tree with
  ``test/{good,bad}`` and ``ground_truth/bad/<stem>.png``.
* VisA raw release: ``ROOT/CLASS/Data/{Images,Masks}/...``, split by ``ROOT/split_csv/1cls.csv``
  (columns object,split,label,image,mask).
* DAGM 2007: ``ClassN/{Train,Test}/NNNN.PNG``, ``Label/Labels.txt`` (a header line, then
  ``id flag image 0 label-or-0``), ``Label/NNNN_label.PNG``. Train: Train images flagged 0; test: all Test.
* ``synthetic`` (= ``synthetic/texture``) or ``synthetic/object``: made in memory (see SyntheticSet).
* A plain folder (none of the above, no class folders below it): every image at any depth is a normal
  training image; it has no test split of its own. ``labelled_folder(TEST)`` reads a labelled test folder:
  ``TEST/good/*`` and ``TEST/<defect type>/*``, masks optional in ``TEST/masks/<type>/<stem>[_mask].png``.
  ``holdout_split`` keeps a fixed slice of a training split out of training (for a decision threshold).

Items are dicts: ``image`` float32 3xHxW in **[0, 1]** (the one pixel range; a model wanting [-1, 1]
maps it itself), ``mask`` float32 1xHxW of 0/1, ``label`` 0/1, ``defect`` ("good" for good), ``path``.
Any PIL mode is read (16-bit divided by 65535, grayscale -> 3 channels) and resized bilinearly; masks
are binarised at native size (non-zero = defect), then resized nearest. Labels come from the layout, so
an anomalous image with an empty mask keeps label 1. Only files with an image extension count; a listed
file that is missing or unreadable is an error, never skipped. Datasets carry ``name``, ``category``
(class) and ``layout``.

Synthesizer (``synthesize``, ``TrainSet``), Eq. 9: S = beta M N + (1 - beta) M A + (1 - M) N with beta
uniform in ``BETA_RANGE`` = [0.2, 0.8) (the authors' code). A step's synthetic images are made from other
normal images than its normal ones (``run_batches``). Options of ours: masks of thin curves or small PCB-sized
marks (``curves_mask``, ``small_mask``), and ``fill="invert"`` (S = 1 - N inside M, for binarised images).
Item i of epoch e draws all its randomness from ``np.random.default_rng((seed, e, i))``, so batches do
not depend on the number of workers.
* M = Perlin mask x foreground F. Noise (about +-1) with 2^a x 2^b cells, a, b uniform in 0..5 (fewer
  below 256 px so that cells stay >= 8 px: 0..3 at 64), randomly rotated, > ``PERLIN_THRESHOLD`` = 0.5:
  blobs cover ~5 % of the image. An empty M is redrawn; after 10 tries it is the top 10 % of noise in F.
* F, "auto" in this order: ``mask`` when the class has per-image foreground files: ours,
  ``CLASS/foreground/<image stem>.*`` (non-zero), or the authors' published DIS masks of objects,
  ``CLASS/DISthresh/good/<image stem>.*`` (>= 128 of 255); ``texture`` for texture classes (MVTec's
  carpet, grid, leather, tile, wood and, as in the authors' code, zipper; DAGM): a random mask from the
  authors' ``CLASS/thresh/`` (>= 128) when that folder exists, else a random rectangle (sides 50-100 % of
  the image); ``object`` for the other MVTec and VisA classes (objects without mask files): an estimate,
  the colour distance to the median border colour > an Otsu threshold, opened and hole-filled; any other
  class: ``object`` if on most of 8 sampled training images the border is uniform and this estimate covers
  3-90 % of the image, else ``texture``; ``none`` = the whole image. A missing or empty (< 0.5 %) F becomes
  the whole image, with one warning. ``TrainSet(foreground=...)`` wins over ``open_dataset(foreground=...)``.
* A: 2 distinct ops (the paper's) from {equalize, sharpness (amount 0.5-2), auto-contrast (cut-off 0-10 %),
  solarize (threshold 32-128/255), posterize (1-4 bits), invert, gamma (0.5-2 per channel)} applied to the
  anomaly source: with ``texture_dir`` (e.g. DTD) a random texture for texture foregrounds, and for the
  others a texture or the image itself with equal chance (the authors' code); without, the image itself.
  A self-augmented image is then cut into 8x8 tiles that are randomly permuted; a texture is not.

CLI: ``python data.py preview --data PATH --out grid.png [--n 8 --img-size 256 --seed 0]`` writes rows
N | A | M | S (M panel: white = anomaly mask, grey = foreground).
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch.utils.data import Dataset

IMG_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
TEXTURE_CLASSES = {"carpet", "grid", "leather", "tile", "wood", "zipper"}  # the authors' texture_list (zipper too)
OBJECT_CLASSES = {"bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush",
                  "transistor", "candle", "capsules", "cashew", "chewinggum", "fryum",
                  "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum"}
FOREGROUNDS = ("auto", "mask", "texture", "object", "none")
BETA_RANGE = (0.2, 0.8)
SHAPES = ("perlin", "curves", "mixed", "small")
FILLS = ("blend", "invert")
PERLIN_THRESHOLD = 0.5


# ----------------------------------------------------------------------------- images and masks
def _open(path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        im = Image.open(path)
        im.load()                                   # decodes fully: truncated files fail here
    except Exception as e:                          # PIL raises OSError, SyntaxError, ValueError...
        raise ValueError(f"cannot read image {path}: {e}") from None
    return im


def _rgb(im: Image.Image, size: int) -> np.ndarray:
    """Any PIL mode -> float32 size x size x 3 in [0, 1] (bilinear); grayscale -> 3 equal channels."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):        # 16/32-bit integer or float gray
        a = np.asarray(im, dtype=np.float32)
        a = a / (65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0 if a.max() > 1 else 1.0)
        im = Image.fromarray(np.clip(a, 0, 1), "F")
    elif im.mode in ("1", "L", "LA"):
        im = im.convert("L")
    else:                                                          # P, RGBA, CMYK, YCbCr... alpha dropped
        im = (im.convert("RGBA") if im.mode == "P" else im).convert("RGB")
    a = np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.float32)
    a = a / 255 if im.mode != "F" else a
    return np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a


def _binary(im: Image.Image, size: int) -> np.ndarray:
    """Mask image -> float32 HxW of 0/1: non-zero at native resolution, then nearest resize."""
    return _nearest(_nonzero(im), size).astype(np.float32)


def _half(im: Image.Image, size: int) -> np.ndarray:
    """Bool HxW of a soft mask image (grey levels), where it reaches half its range (>= 128 of 255)."""
    return np.asarray(im.convert("L").resize((size, size), Image.BILINEAR)) >= 128


def _nonzero(im: Image.Image) -> np.ndarray:
    a = np.asarray(im)
    if a.ndim == 3:
        a = a[..., :3 if a.shape[2] >= 3 else 1].any(axis=2)     # alpha ignored
    return a != 0


def _nearest(a: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of a bool HxW array: each output pixel samples the source pixel under its centre."""
    rows = np.minimum(((np.arange(size) + 0.5) * a.shape[0] / size).astype(int), a.shape[0] - 1)
    cols = np.minimum(((np.arange(size) + 0.5) * a.shape[1] / size).astype(int), a.shape[1] - 1)
    return a[rows][:, cols]


def defect_mask(im: Image.Image, size: int) -> tuple[np.ndarray, int]:
    """A ground-truth mask at size x size: nearest resize, except that a defect region (8-connected) that
    no output pixel samples, such as a 2-px scratch at a quarter of its size, keeps one pixel, at its
    centre. Returns (float32 HxW of 0/1, how many regions were kept that way)."""
    a = _nonzero(im)
    m = _nearest(a, size)
    labels, n = ndimage.label(a, np.ones((3, 3), bool))
    lost = sorted(set(range(1, n + 1)) - set(np.unique(_nearest(labels, size)).tolist())) if n else []
    for cy, cx in ndimage.center_of_mass(a, labels, lost) if lost else []:
        m[min(int(cy * size / a.shape[0]), size - 1), min(int(cx * size / a.shape[1]), size - 1)] = True
    return m.astype(np.float32), len(lost)


def probe(path) -> tuple[int, int] | str:
    """A fast check of an image file without decoding its pixels: the header must parse and a PNG or JPEG
    must end with its end marker (a truncated file does not). Returns (width, height), or what is wrong."""
    try:
        with Image.open(path) as im:
            size, fmt = im.size, im.format
        with open(path, "rb") as f:
            f.seek(max(0, Path(path).stat().st_size - 64))
            tail = f.read()
    except Exception as e:                          # OSError, PIL.UnidentifiedImageError, SyntaxError...
        return f"not a readable image ({type(e).__name__}: {e})"
    if (fmt == "PNG" and b"IEND" not in tail[-12:]) or (fmt == "JPEG" and b"\xff\xd9" not in tail):
        return f"truncated {fmt} file (no end marker)"
    return size


def check_split(ds) -> list[str]:
    """Every problem of a dataset split at once, one line each: unreadable or truncated images and masks,
    masks whose size differs from their image's. Header checks only (see probe)."""
    problems = []
    for path, mpath, _, _ in getattr(ds, "records", []):
        size = probe(path)
        if isinstance(size, str):
            problems.append(f"{path}: {size}")
        if mpath is not None:
            msize = probe(mpath)
            if isinstance(msize, str):
                problems.append(f"{mpath} (mask of {Path(path).name}): {msize}")
            elif not isinstance(size, str) and msize != size:
                problems.append(f"{mpath}: mask is {msize[0]}x{msize[1]} but its image is {size[0]}x{size[1]}; "
                                "resize the mask to its image or replace it")
    return problems


def check_dataset(path, img_size: int, foreground: str = "auto", test=None, test_masks=None) -> tuple[dict, list[str]]:
    """Both splits of a dataset and every problem found in them at once: a layout error (missing folder or
    mask, empty split...) or a file that check_split finds bad. test: a labelled test folder (labelled_folder)
    instead of the dataset's own test split; a plain folder without one has no test split. Returns
    ({split: dataset}, problems)."""
    splits, problems = {}, []
    for split in ("train", "test"):
        try:
            if split == "test" and test:
                splits[split] = labelled_folder(test, img_size, test_masks)
            elif split == "test" and getattr(splits.get("train"), "layout", None) == "folder":
                continue                                # a plain folder of normal images: no test split
            else:
                splits[split] = open_dataset(path, split, img_size, foreground=foreground)
            problems += check_split(splits[split])
        except (FileNotFoundError, ValueError) as e:
            problems.append(str(e))
    if test and Path(path).is_dir() and Path(test).resolve().is_relative_to(Path(path).resolve()):
        problems.append(f"--test {test} is inside --data {path}: its images would be trained on as normal; "
                        "move it out of the training folder")
    return splits, list(dict.fromkeys(problems))   # a missing folder fails both splits alike


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTS) if folder.is_dir() else []


def _chw(a: np.ndarray) -> torch.Tensor:
    """HxWxC array -> contiguous float32 CxHxW tensor."""
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1), dtype=np.float32))


def list_images(inputs) -> list[Path]:
    """Image files and the images found (recursively) in folders, in order; FileNotFoundError names a
    missing path or a folder without images."""
    files = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMG_EXTS)
            if not found:
                raise FileNotFoundError(f"{p}: no image files ({', '.join(sorted(IMG_EXTS))}) in this folder")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def load_image(path, img_size: int) -> torch.Tensor:
    """A user's image as the model sees it: float32 3xHxW in [0, 1]; errors name the file."""
    return _chw(_rgb(_open(path), img_size))


def to_uint8(x) -> np.ndarray:
    """(3,H,W) tensor in [0, 1] -> (H,W,3) uint8, for PNG panels."""
    return _u8(x.permute(1, 2, 0).numpy())


def heatmap(m) -> np.ndarray:
    """(H,W) map in [0, 1] -> (H,W,3) uint8, blue (normal) to red (anomalous): a jet-like colour scale."""
    v = np.clip(m, 0, 1)[..., None]
    return _u8(np.clip(1.5 - np.abs(4 * v - np.array([3.0, 2.0, 1.0])), 0, 1))


def save_png(path, array):
    Image.fromarray(array).save(path)


def _item(img, mask, label, defect, path) -> dict:
    return {"image": _chw(img), "mask": torch.from_numpy(np.ascontiguousarray(mask[None], dtype=np.float32)),
            "label": int(label), "defect": defect, "path": str(path)}


# ----------------------------------------------------------------------------- datasets on disk
class ImageDataset(Dataset):
    """Records (image, mask or None, label, defect), read lazily. ``fg_kind``: the foreground that
    "auto" means for this class (None: estimate it from the images, see TrainSet)."""

    def __init__(self, records, img_size, root: Path, layout: str, foreground="auto"):
        self.records, self.img_size, self.root, self.layout = records, int(img_size), root, layout
        self.name, self.category, self.foreground = root.parent.name or "data", root.name, foreground
        # foreground masks per image: ours (CLASS/foreground/<stem>.*), else the authors' DIS masks of objects
        # (CLASS/DISthresh/good/<stem>.*); texture classes: the authors' random parts (CLASS/thresh/*)
        self.fg_dir = next((d for d in (root / "foreground", root / "DISthresh" / "good") if d.is_dir()), None)
        self.has_fg_masks = self.fg_dir is not None
        self.thresh, self._parts = _images(root / "thresh"), {}
        cls = root.name.lower()
        self.fg_kind = ("mask" if self.has_fg_masks else "texture" if layout == "dagm" or cls in TEXTURE_CLASSES
                        else "object" if cls in OBJECT_CLASSES else None)
        self._warned = False

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        path, mpath, label, defect = self.records[i]
        im = _open(path)
        mask, kept = np.zeros((self.img_size, self.img_size), np.float32), 0
        if mpath is not None:
            m = _open(mpath)
            if m.size != im.size and not self._warned:
                self._warned = True
                warnings.warn(f"mask {mpath} is {m.size[0]}x{m.size[1]} but its image {path} is "
                              f"{im.size[0]}x{im.size[1]}; resizing (warned once per dataset)", stacklevel=2)
            mask, kept = defect_mask(m, self.img_size)
        return {**_item(_rgb(im, self.img_size), mask, label, defect, path), "regions_kept": kept,
                "has_mask": mpath is not None or label == 0}

    def foreground_mask(self, i):
        """Bool HxW from ``CLASS/foreground/<stem>.*`` (non-zero) or ``CLASS/DISthresh/good/<stem>.*`` (the
        authors' soft DIS masks, at least half their range), or None when there is no such file."""
        stem = Path(self.records[i][0]).stem
        files = [p for p in sorted(self.fg_dir.glob(stem + ".*")) if p.suffix.lower() in IMG_EXTS] if self.fg_dir else []
        if not files:
            return None
        return _binary(_open(files[0]), self.img_size) > 0 if self.fg_dir.name == "foreground" else \
            _half(_open(files[0]), self.img_size)

    def texture_part(self, rng):
        """A random mask of the authors' CLASS/thresh/ (at least half its range), or None when there is none."""
        if not self.thresh:
            return None
        k = int(rng.integers(len(self.thresh)))
        if k not in self._parts:                                 # read once per worker, packed
            self._parts[k] = np.packbits(_half(_open(self.thresh[k]), self.img_size))
        return np.unpackbits(self._parts[k], count=self.img_size ** 2).reshape(self.img_size, self.img_size).astype(bool)


def _mvtec(root: Path, split: str):
    if split == "train":
        return [(p, None, 0, "good") for p in _images(root / "train" / "good")]
    recs, missing = [], []
    for d in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        gt = root / "ground_truth" / d.name
        # <stem>_mask.png (MVTec) or <stem>.png (VisA 1cls); the former wins when both exist
        masks = {m.stem.removesuffix("_mask"): m for m in sorted(_images(gt), key=lambda p: p.stem.endswith("_mask"))}
        for p in _images(d):
            if d.name != "good" and p.stem not in masks:
                missing.append(f"{p} has no mask: expected {gt / (p.stem + '_mask.png')} or {gt / (p.stem + '.png')}")
            else:
                recs.append((p, None, 0, "good") if d.name == "good" else (p, masks[p.stem], 1, d.name))
    if missing:
        raise FileNotFoundError(f"{len(missing)} anomalous test image(s) without a mask: " + "; ".join(missing[:5])
                                + ("; ..." if len(missing) > 5 else ""))
    return recs


def _visa_raw(root: Path, split: str):
    csv_path = root.parent / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"{root} looks like the raw VisA release (Data/Images) but the split file "
                                f"{csv_path} is missing; copy split_csv/ from the VisA release next to {root.name}/")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if not {"object", "split", "label", "image", "mask"} <= set(reader.fieldnames or ()):
            raise ValueError(f"{csv_path}: expected columns object,split,label,image,mask, found {reader.fieldnames}")
        rows = list(reader)
    mine = [r for r in rows if r["object"] == root.name]
    if not mine:
        have = sorted({r["object"] for r in rows})
        raise ValueError(f"{csv_path} has no rows for class {root.name!r}; it has {have}")
    recs = []
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
        recs.append((img, mask, label, "good" if label == 0 else r["label"]))
    return recs


def _dagm(root: Path, split: str):
    sub = root / ("Train" if split == "train" else "Test")
    labels = sub / "Label" / "Labels.txt"
    if not labels.is_file():
        raise FileNotFoundError(f"DAGM layout: {labels} is missing")
    recs, listed = [], set()
    for n, line in enumerate(labels.read_text().splitlines()[1:], start=2):   # line 1 is a header
        f = line.split()
        if not f:
            continue
        if len(f) != 5 or f[1] not in ("0", "1"):
            raise ValueError(f"{labels}:{n}: expected 'id flag image 0 label-or-0', got {line!r}")
        img, flag = sub / f[2], int(f[1])
        listed.add(f[2])
        if not img.is_file():
            raise FileNotFoundError(f"{labels}:{n} lists {img}, which does not exist")
        mask = sub / "Label" / f[4] if flag else None
        if flag and (f[4] == "0" or not mask.is_file()):
            raise FileNotFoundError(f"defective DAGM image {img} has no mask ({labels}:{n} names {f[4]!r})")
        if not (split == "train" and flag):     # the unsupervised setting: defective Train never used
            recs.append((img, mask, flag, "defect" if flag else "good"))
    unlisted = sorted(p.name for p in _images(sub) if p.name not in listed)
    if unlisted:
        raise ValueError(f"{sub}: {len(unlisted)} images not listed in {labels}, e.g. {unlisted[:3]}")
    return recs


def open_dataset(path, split: str, img_size: int, foreground: str = "auto") -> Dataset:
    """The train (normal only) or test split of the dataset at ``path`` (see module docstring)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if foreground not in FOREGROUNDS:
        raise ValueError(f"foreground must be one of {FOREGROUNDS}, got {foreground!r}")
    s = str(path).rstrip("/")
    if s == "synthetic" or s.startswith("synthetic/"):
        return SyntheticSet(split, img_size, s.partition("/")[2] or "texture", foreground)
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
        classes = find_classes(root)
        if classes:
            raise ValueError(f"{root} holds {len(classes)} classes ({', '.join(p.name for p in classes[:5])}"
                             f"{', ...' if len(classes) > 5 else ''}); pass one class, e.g. {classes[0]}")
        records = _folder(root)
        if not records:
            raise ValueError(f"{root}: no image files ({', '.join(sorted(IMG_EXTS))}, any case) in it or its "
                             "subfolders, and no known layout; tried: MVTec AD / VisA 1cls (train/good + test/), "
                             "VisA raw (Data/Images + ../split_csv/1cls.csv), DAGM 2007 (Train|Test/Label/Labels.txt), "
                             "a plain folder of normal images, 'synthetic'")
        if split == "test":
            raise ValueError(f"{root} is a plain folder of normal images: it has no test split; pass --test "
                             "TESTDIR (good/ and one folder per defect type)")
        return ImageDataset(records, img_size, root, "folder", foreground)
    records = {"mvtec": _mvtec, "visa-1cls": _mvtec, "visa-raw": _visa_raw, "dagm": _dagm}[layout](root, split)
    if not records:
        raise ValueError(f"empty {split} set: no images found in {root} ({layout} layout)")
    return ImageDataset(records, img_size, root, layout, foreground)


def _folder(root: Path):
    """A plain folder: every image below it (any depth, hidden folders skipped) is a normal training image."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMG_EXTS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return [(p, None, 0, "good") for p in files]


def labelled_folder(path, img_size: int, masks=None) -> Dataset:
    """A labelled test folder: ``good/`` holds normal images, every other folder one defect type (any name,
    images at any depth below it). Masks are optional: ``<type>/<stem>.png`` or ``<type>/<stem>_mask.png``
    (any image extension) under ``masks`` (default ``path/masks``, which is then not a defect type). An
    anomalous image without a mask keeps label 1 and ``has_mask`` False: pixel metrics leave it out."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"test folder {root} does not exist")
    mroot = Path(masks).expanduser() if masks else root / "masks"
    if masks and not mroot.is_dir():
        raise FileNotFoundError(f"mask folder {mroot} does not exist")
    if not (root / "good").is_dir():
        raise ValueError(f"test folder {root} has no good/ folder: put the normal test images in {root / 'good'} "
                         "and each defect type in a folder of its own")
    recs = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p != mroot and not p.name.startswith(".")):
        found = {m.stem.removesuffix("_mask"): m for m in sorted(_images(mroot / d.name), key=lambda p: p.stem.endswith("_mask"))}
        for p in sorted(f for f in d.rglob("*") if f.suffix.lower() in IMG_EXTS and f.is_file()):
            recs.append((p, None, 0, "good") if d.name == "good" else (p, found.get(p.stem), 1, d.name))
    if not any(r[2] == 0 for r in recs) or not any(r[2] == 1 for r in recs):
        raise ValueError(f"test folder {root} needs images in good/ and in at least one defect folder")
    return ImageDataset(recs, img_size, root, "labelled")


def find_classes(root) -> list[Path]:
    """The class folders of a whole-benchmark root, sorted: a DAGM 2007 root (Class1..Class10), a VisA raw
    release (split_csv/1cls.csv and its class folders), or an MVTec AD / VisA 1cls root (folders with
    train/ and test/). [] when root is not such a root (for example, a single class)."""
    root = Path(root).expanduser()
    if not root.is_dir() or open_layout(root) is not None:
        return []
    csv_path = root / "split_csv" / "1cls.csv"
    if csv_path.is_file():
        with open(csv_path, newline="") as f:
            names = sorted({r.get("object", "") for r in csv.DictReader(f)} - {""})
        return [root / n for n in names if (root / n / "Data" / "Images").is_dir()]
    natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]  # Class2 < Class10
    return sorted((p for p in root.iterdir() if p.is_dir() and open_layout(p) is not None), key=natural)


def open_layout(root: Path) -> str | None:
    """The layout of a class folder by its files alone (None: not a class folder)."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "visa-1cls" if (root / "test" / "bad").is_dir() else "mvtec"
    if (root / "Data" / "Images").is_dir():
        return "visa-raw"
    if any((root / s / "Label" / "Labels.txt").is_file() for s in ("Train", "Test")):
        return "dagm"
    return None


class Part(Dataset):
    """The items ``indices`` of a dataset, with its attributes (name, layout, foreground...)."""

    def __init__(self, ds, indices):
        self.ds, self.indices = ds, [int(i) for i in indices]
        if hasattr(ds, "records"):
            self.records = [ds.records[i] for i in self.indices]

    def __getattr__(self, name):
        if name in ("ds", "indices"):
            raise AttributeError(name)
        return getattr(self.ds, name)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.ds[self.indices[i]]

    def foreground_mask(self, i):
        return self.ds.foreground_mask(self.indices[i])


def holdout_split(ds, fraction: float, minimum: int = 5):
    """(training part, held-out part) of a train split: ceil(fraction * n) images, at least ``minimum``,
    chosen by a permutation with a fixed seed (the same for every run and seed), kept out of training to
    set the decision threshold. fraction 0: (ds, None)."""
    if fraction <= 0:
        return ds, None
    n = len(ds)
    k = max(math.ceil(fraction * n), minimum)
    if n - k < 2:
        raise ValueError(f"{n} normal training images are too few to hold out {k} for the threshold; "
                         "add images or pass --holdout 0 (then no threshold is stored)")
    held = set(np.random.default_rng(0).permutation(n)[:k].tolist())
    return Part(ds, [i for i in range(n) if i not in held]), Part(ds, sorted(held))


# ----------------------------------------------------------------------------- synthesizer
def perlin(shape, res, rng, angle=0.0) -> np.ndarray:
    """Gradient (Perlin) noise with res = (ry, rx) cells across the image, rotated by angle; about +-1."""
    H, W = shape
    ys = (np.arange(H, dtype=np.float32)[:, None] + 0.5) / H - 0.5
    xs = (np.arange(W, dtype=np.float32)[None, :] + 0.5) / W - 0.5
    c, s = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    py, px = (xs * s + ys * c) * np.float32(res[0]), (xs * c - ys * s) * np.float32(res[1])  # lattice units
    y0, x0 = np.floor(py), np.floor(px)
    fy, fx = py - y0, px - x0
    j, i = (y0 - y0.min()).astype(np.int32), (x0 - x0.min()).astype(np.int32)
    tx = int(i.max()) + 2
    theta = rng.uniform(0, 2 * np.pi, (int(j.max()) + 2) * tx)      # one random gradient per lattice point
    g = np.stack([np.sin(theta), np.cos(theta)], 1).astype(np.float32).view(np.complex64).ravel()
    k = j * tx + i

    def dot(k, dy, dx):
        v = np.take(g, k)
        return v.real * dy + v.imag * dx
    n00, n01 = dot(k, fy, fx), dot(k + 1, fy, fx - 1)
    n10, n11 = dot(k + tx, fy - 1, fx), dot(k + tx + 1, fy - 1, fx - 1)
    uy, ux = [t * t * t * (t * (t * 6 - 15) + 10) for t in (fy, fx)]   # fade curve
    top, bot = n00 + ux * (n01 - n00), n10 + ux * (n11 - n10)
    return np.float32(math.sqrt(2)) * (top + uy * (bot - top))       # scaled to about +-1


def _u8(x):
    return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def _equalize(x, rng):
    q, out = _u8(x), np.empty_like(x)
    for c in range(3):
        cdf = np.cumsum(np.bincount(q[..., c].ravel(), minlength=256))
        lo = cdf[np.flatnonzero(cdf)[0]]
        lut = (cdf - lo) / max(cdf[-1] - lo, 1)
        out[..., c] = lut[q[..., c]] if cdf[-1] > lo else x[..., c]
    return out


def _autocontrast(x, rng):
    q, cut, out = _u8(x), rng.uniform(0, 0.1), np.empty_like(x)
    for c in range(3):
        cdf = np.cumsum(np.bincount(q[..., c].ravel(), minlength=256))
        lo, hi = np.searchsorted(cdf, [cut * cdf[-1], (1 - cut) * cdf[-1]]) / 255
        out[..., c] = np.clip((x[..., c] - lo) / max(hi - lo, 1 / 255), 0, 1)
    return out


AUGMENTATIONS = {
    "equalize": _equalize,
    "sharpness": lambda x, r: np.clip(x + r.uniform(0.5, 2.0) * (x - ndimage.uniform_filter(x, (3, 3, 1))), 0, 1),
    "autocontrast": _autocontrast,
    "solarize": lambda x, r: np.where(x >= r.uniform(32, 128) / 255, 1 - x, x),
    "posterize": lambda x, r: (_u8(x) & np.uint8((0xFF << (8 - int(r.integers(1, 5)))) & 0xFF)) / np.float32(255),
    "invert": lambda x, r: 1 - x,
    "gamma": lambda x, r: x ** r.uniform(0.5, 2.0, 3).astype(np.float32),
}


def augment(x, rng, n_ops=2) -> np.ndarray:
    """n_ops distinct random operations from AUGMENTATIONS, in random order."""
    names = list(AUGMENTATIONS)
    for k in rng.choice(len(names), n_ops, replace=False):
        x = AUGMENTATIONS[names[k]](x, rng).astype(np.float32)
    return x


def shuffle_tiles(x, rng, grid=8) -> np.ndarray:
    """Cut into grid x grid tiles, permute them randomly (edge rows/columns beyond a multiple stay)."""
    H, W, C = x.shape
    th, tw = H // grid, W // grid
    if th == 0 or tw == 0:
        return x
    out = x.copy()
    tiles = x[:grid * th, :grid * tw].reshape(grid, th, grid, tw, C).swapaxes(1, 2).reshape(-1, th, tw, C)
    tiles = tiles[rng.permutation(grid * grid)]
    out[:grid * th, :grid * tw] = tiles.reshape(grid, grid, th, tw, C).swapaxes(1, 2).reshape(grid * th, grid * tw, C)
    return out


def curves_mask(H, W, rng, lengths=(0.08, 0.3), count=(1, 4)) -> np.ndarray:
    """1-3 thin curved strokes (quadratic Bezier curves 8-30 % of the image long, 1 or 3 px wide at 256 px):
    scratch-like anomaly masks (ours; an option, the paper's masks are Perlin blobs). lengths: the range of
    a stroke's length as a fraction of the image side; count: the range of the number of strokes."""
    M, side = np.zeros((H, W), bool), min(H, W)
    for _ in range(int(rng.integers(*count))):
        p0 = rng.uniform(0, 1, 2) * (H, W)
        length, angle = rng.uniform(*lengths) * side, rng.uniform(0, np.pi)
        d = np.array([np.sin(angle), np.cos(angle)]) * length
        p1 = p0 + d / 2 + rng.normal(0, 0.25) * np.array([d[1], -d[0]])   # the bend, across the stroke
        t = np.linspace(0, 1, int(3 * length) + 2)[:, None]
        yx = np.round((1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t ** 2 * (p0 + d)).astype(int)
        ok = (yx[:, 0] >= 0) & (yx[:, 0] < H) & (yx[:, 1] >= 0) & (yx[:, 1] < W)
        M[yx[ok, 0], yx[ok, 1]] = True
    r = int(round(rng.uniform(0.5, 1.5) * side / 256))
    return ndimage.binary_dilation(M, ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), r)) if r else M


def small_mask(H, W, rng, k=4) -> np.ndarray:
    """1-4 small marks as a soft mask (float HxW in [0, 1]), each a spot (an ellipse with axes 2-6 x 2-12 px)
    or a short stroke (4-18 px long, 1-3 px wide), sizes at 256 px and scaled with the image side (ours; an
    option). Sized like printed circuit board defects: on DeepPCB a defect region measures a median 2.4 x
    8.4 px at 256 px (5-95 %: 1-5 px thick, 4-17 px long), smaller than most Perlin blobs and curves.
    Each mark is drawn on a k x k sub-pixel grid and averaged: its edges are anti-aliased, as every edge
    of a real image is after the loader's resize. Marks with hard pixel edges are a cue no real defect
    gives: a model trained on them found them all and missed the same marks drawn at DeepPCB's 640 px and
    resized (docs/RESULTS.md). k = 1 gives hard edges."""
    out, s = np.zeros((H, W), np.float32), min(H, W) / 256
    for _ in range(int(rng.integers(1, 5))):
        cy, cx = rng.uniform(0, 1, 2) * (H, W)
        spot = rng.random() < 0.5
        if spot:                                                # pin hole, spurious copper, mouse bite
            a, b, angle = max(rng.uniform(1, 3) * s, 0.75), max(rng.uniform(1, 6) * s, 0.75), rng.uniform(0, np.pi)
            reach = max(a, b)
        else:                                                   # a stroke: short, open, spur
            length, angle, bend = rng.uniform(4, 18) * s, rng.uniform(0, np.pi), rng.normal(0, 0.25)
            half = max(rng.uniform(0.5, 1.5) * s, 0.5)          # half its width, at least half a pixel
            d = np.array([np.sin(angle), np.cos(angle)]) * length
            p0 = np.array([cy, cx]) - d / 2
            p1 = p0 + d / 2 + bend * np.array([d[1], -d[0]])    # the bend, across the stroke
            t = np.linspace(0, 1, int(3 * length) + 2)[:, None]
            curve = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t ** 2 * (p0 + d)   # (n, 2) points
            reach = length / 2 + abs(bend) * length + half
        top, left = max(int(cy - reach) - 1, 0), max(int(cx - reach) - 1, 0)
        bottom, right = min(int(cy + reach) + 2, H), min(int(cx + reach) + 2, W)
        if bottom <= top or right <= left:
            continue
        y, x = np.mgrid[top * k:bottom * k, left * k:right * k]
        y, x = (y + 0.5) / k, (x + 0.5) / k                     # sub-pixel centres, in pixels
        if spot:
            u = (y - cy) * math.cos(angle) + (x - cx) * math.sin(angle)
            v = (x - cx) * math.cos(angle) - (y - cy) * math.sin(angle)
            inside = (u / a) ** 2 + (v / b) ** 2 <= 1
        else:
            near = np.full(y.shape, np.inf, np.float32)
            for py, px in curve:                                # distance to the curve's points
                near = np.minimum(near, (y - py) ** 2 + (x - px) ** 2)
            inside = near <= half ** 2
        cover = inside.reshape(bottom - top, k, right - left, k).mean((1, 3))
        out[top:bottom, left:right] = np.maximum(out[top:bottom, left:right], cover)
    return out


def synthesize(image, fg_mask, rng, texture=None, beta_range=BETA_RANGE, threshold=PERLIN_THRESHOLD,
               details=False, shape="perlin", fill="blend"):
    """Eq. (9) on one normal image (HxWx3 float in [0, 1]) -> (S, M) float32 (M is HxW of 0/1).
    fg_mask: HxW bool or None (whole image). details=True returns (S, M, A, beta). shape: the mask M,
    "perlin" (paper), "curves" (curves_mask), "mixed" (either, with equal chance) or "small"
    (small_mask: S uses its soft edges, M is where it reaches 0.5).
    fill: "blend" (Eq. 9, paper) or "invert": S = 1 - N inside M (A = 1 - N, beta = 0, no tiles; ours, for
    binarised images such as PCB scans, where a defect is the other material, never a grey blend).
    texture: an anomaly source image (HxWx3, e.g. from DTD), augmented; None: self-augmentation, N augmented and
    cut into shuffled tiles (the authors shuffle only the self-augmented source, never DTD's)."""
    N = np.asarray(image, np.float32)
    H, W = N.shape[:2]
    F = np.ones((H, W), bool) if fg_mask is None else np.asarray(fg_mask, bool)
    if not F.any():
        raise ValueError("synthesize: empty foreground mask")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    M = soft = None
    if shape == "small":
        for _ in range(10):
            soft = small_mask(H, W, rng) * F
            M = soft >= 0.5
            if M.any():
                break
        else:
            M = soft = None                                     # none landed on the foreground: Perlin
    elif shape == "curves" or (shape == "mixed" and rng.random() < 0.5):
        for _ in range(10):
            M = curves_mask(H, W, rng) & F
            if M.any():
                break
        else:
            M = None                                            # none landed on the foreground: Perlin
    if M is None:
        top = int(np.clip(np.log2(min(H, W) / 8), 0, 5))        # 2^0..2^5 at 256; cells >= 8 px
        for _ in range(10):                                     # an empty mask is redrawn
            res = (2 ** int(rng.integers(0, top + 1)), 2 ** int(rng.integers(0, top + 1)))
            noise = perlin((H, W), res, rng, rng.uniform(-np.pi / 2, np.pi / 2))
            M = (noise > threshold) & F
            if M.any():
                break
        else:
            M = F & (noise >= np.quantile(noise[F], 0.9))
    if fill == "invert":
        A, beta = 1 - N, 0.0
    else:
        A = shuffle_tiles(augment(N, rng), rng) if texture is None else augment(np.asarray(texture, np.float32), rng)
        beta = float(rng.uniform(*beta_range))
    m = (M if soft is None else soft)[..., None].astype(np.float32)
    S = (beta * (m * N) + (1 - beta) * (m * A) + (1 - m) * N).astype(np.float32)   # Eq. (9)
    return (S, M.astype(np.float32), A, beta) if details else (S, M.astype(np.float32))


def _otsu(v: np.ndarray) -> float:
    h, edges = np.histogram(v, bins=64, range=(0, 1))
    w0 = np.cumsum(h)[:-1].astype(np.float64)
    mids = (edges[:-1] + edges[1:]) / 2
    m0 = np.cumsum(h * mids)[:-1]
    w1, total = h.sum() - w0, (h * mids).sum()
    between = np.where((w0 > 0) & (w1 > 0), (total * w0 - m0 * h.sum()) ** 2 / np.maximum(w0 * w1, 1), 0)
    return float(edges[1:][np.argmax(between)])


def estimate_foreground(img: np.ndarray) -> tuple[np.ndarray, bool]:
    """(foreground, border_is_uniform): colour distance to the median border colour > Otsu threshold."""
    b = max(1, min(img.shape[:2]) // 16)
    ring = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3),
                           img[:, :b].reshape(-1, 3), img[:, -b:].reshape(-1, 3)])
    ref = np.median(ring, axis=0)
    d = np.abs(img - ref).max(axis=2)
    fg = d > max(_otsu(d), 0.05)
    fg = ndimage.binary_fill_holes(ndimage.binary_opening(fg, np.ones((3, 3), bool), iterations=2))
    return fg, float(np.quantile(np.abs(ring - ref).max(axis=1), 0.9)) < 0.08


class TrainSet(Dataset):
    """Alg. 1's images (Sec. 3.3). Key (epoch, i, synthetic): normal image i as it is, or a synthetic anomaly S
    made from it, each a dict of ``image`` (3xHxW), ``mask`` (1xHxW, zero for a normal image), ``source`` (the
    anomaly-free image: N itself for both) and ``path``. run_batches makes a step of B images from B distinct
    normal images, the first B/2 as they are, the others synthetic (the paper's 3 + 3 = 6; the authors' code
    draws every training sample independently). A plain index i is (the set epoch, i, synthetic). normal: a train
    split from open_dataset; foreground: one of FOREGROUNDS ("auto": the dataset's choice); texture_dir: optional
    folder (searched recursively) of anomaly source textures, e.g. DTD: texture classes take their anomaly source
    from it always, others half of the time and self-augmentation otherwise (the authors' code). Call set_epoch(e)."""

    def __init__(self, normal, seed=0, texture_dir=None, foreground="auto", beta_range=BETA_RANGE,
                 threshold=PERLIN_THRESHOLD, shape="perlin", fill="blend"):
        if foreground not in FOREGROUNDS:
            raise ValueError(f"foreground must be one of {FOREGROUNDS}, got {foreground!r}")
        self.normal, self.seed, self.epoch = normal, int(seed), 0
        if shape not in SHAPES:
            raise ValueError(f"anomaly shape must be one of {SHAPES}, got {shape!r}")
        if fill not in FILLS:
            raise ValueError(f"anomaly fill must be one of {FILLS}, got {fill!r}")
        self.beta_range, self.threshold, self.shape, self.fill = tuple(beta_range), threshold, shape, fill
        self._warned = False
        self.textures = []
        if texture_dir is not None:
            if not Path(texture_dir).is_dir():
                raise FileNotFoundError(f"texture folder {texture_dir} does not exist")
            self.textures = sorted(p for p in Path(texture_dir).rglob("*") if p.suffix.lower() in IMG_EXTS)
            if not self.textures:
                raise ValueError(f"texture folder {texture_dir} contains no images")
        fg = foreground if foreground != "auto" else getattr(normal, "foreground", "auto")
        if fg == "auto":
            fg = getattr(normal, "fg_kind", None) or self._guess_kind()
        if fg == "mask" and not getattr(normal, "has_fg_masks", False):
            raise ValueError(f"foreground='mask' but {getattr(normal, 'root', 'this dataset')} has no foreground "
                             "masks (expected CLASS/foreground/<image stem>.png or CLASS/DISthresh/good/<image stem>.png)")
        self.foreground, self._fg_cache = fg, {}

    def _guess_kind(self) -> str:
        idx = np.linspace(0, len(self.normal) - 1, min(8, len(self.normal))).astype(int)
        votes = []
        for i in idx:
            fg, uniform = estimate_foreground(self.normal[int(i)]["image"].numpy().transpose(1, 2, 0))
            votes.append(uniform and 0.03 < fg.mean() < 0.9)
        return "object" if sum(votes) > len(votes) / 2 else "texture"

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.normal)

    def _fg(self, i, N, rng):
        H, W = N.shape[:2]
        parts = getattr(self.normal, "texture_part", None) if self.foreground == "texture" else None
        part = parts(rng) if parts else None
        if part is not None and part.mean() >= 0.005:           # the authors' random parts (CLASS/thresh/)
            return part
        if self.foreground == "texture":                        # a random rectangular part
            h, w = int(rng.integers(H // 2, H + 1)), int(rng.integers(W // 2, W + 1))
            y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            F = np.zeros((H, W), bool)
            F[y:y + h, x:x + w] = True
            return F
        if self.foreground != "none" and i not in self._fg_cache:   # fixed per image: cached, packed
            F = self.normal.foreground_mask(i) if self.foreground == "mask" else estimate_foreground(N)[0]
            why = "no foreground file" if F is None else "empty foreground" if F.mean() < 0.005 else ""
            self._fg_cache[i] = None if why else np.packbits(F)
            if why and not self._warned:
                self._warned = True
                warnings.warn(f"foreground '{self.foreground}': {why} for {self.normal[i]['path']}; "
                              "using the whole image (warned once)", stacklevel=3)
        F = self._fg_cache.get(i)                               # None: "none", or no usable foreground
        return np.ones((H, W), bool) if F is None else np.unpackbits(F, count=H * W).reshape(H, W).astype(bool)

    def sample(self, i: int, epoch: int | None = None) -> dict:
        """All parts as numpy: image N, anomaly source A, foreground F, mask M, synthetic S, beta."""
        i = int(i)
        rng = np.random.default_rng((self.seed, self.epoch if epoch is None else int(epoch), i))
        item = self.normal[i]
        N = item["image"].numpy().transpose(1, 2, 0)
        F = self._fg(i, N, rng)
        dtd = self.textures and (self.foreground == "texture" or rng.random() < 0.5)  # textures: DTD; objects: 50/50
        tex = _rgb(_open(self.textures[rng.integers(len(self.textures))]), N.shape[0]) if dtd else None
        S, M, A, beta = synthesize(N, F, rng, tex, self.beta_range, self.threshold, details=True, shape=self.shape,
                                   fill=self.fill)
        return {"image": N, "anomaly": A, "foreground": F, "mask": M, "synthetic": S, "beta": beta,
                "path": item["path"]}

    def __getitem__(self, key):
        """key: (epoch, index, synthetic), or an index: the synthetic image of the epoch set by set_epoch."""
        epoch, i, synthetic = key if isinstance(key, tuple) else (None, key, True)
        if not synthetic:
            item = self.normal[int(i)]
            return {"image": item["image"], "mask": torch.zeros_like(item["image"][:1]), "source": item["image"],
                    "label": 0, "path": item["path"]}
        p = self.sample(i, epoch)
        return {"image": _chw(p["synthetic"]), "mask": torch.from_numpy(p["mask"][None].copy()),
                "source": _chw(p["image"]), "label": 1, "path": p["path"]}


# ----------------------------------------------------------------------------- training batches
def epoch_batches(n_items, per_batch, seed, epoch):
    """The epoch's batches of item indices: a permutation seeded by (seed, epoch), so resumable."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    steps = n_items // per_batch
    return torch.randperm(n_items, generator=g)[: steps * per_batch].view(steps, per_batch).tolist()


def step_keys(indices, epoch):
    """TrainSet keys of one step's distinct images: the first half as they are, the second half synthetic."""
    half = len(indices) // 2
    return [(epoch, i, False) for i in indices[:half]] + [(epoch, i, True) for i in indices[half:]]


def epoch_steps(n_items, per_batch, seed, start, total, rank=0, world=1):
    """(epoch, this rank's item indices) of every step from `start` to `total`: each epoch's permutation cut into
    global batches of per_batch * world images (every normal image once per epoch), rank r taking the r-th part."""
    steps_per_epoch = n_items // (per_batch * world)
    batches = None
    for step in range(start, total):
        epoch, k = divmod(step, steps_per_epoch)
        if batches is None or k == 0:
            batches = epoch_batches(n_items, per_batch * world, seed, epoch)
        yield epoch, batches[k][rank * per_batch:(rank + 1) * per_batch]


def run_batches(n_items, per_batch, seed, start, total, rank=0, world=1):
    """TrainSet keys of this rank's share of every step from `start` to `total` (epoch_steps), half normal, half
    synthetic (step_keys). One pass feeds the whole run, so DataLoader workers live as long as the run."""
    for epoch, indices in epoch_steps(n_items, per_batch, seed, start, total, rank, world):
        yield step_keys(indices, epoch)


def independent_batches(n_items, per_batch, seed, start, total, rank=0, world=1):
    """The authors' batches (their train.py: a shuffled loader, each sample made synthetic with probability 1/2):
    the steps of epoch_steps, each image of an epoch normal or synthetic (made from itself) by a coin drawn from
    (seed, epoch)."""
    coins = (None, None)
    for epoch, indices in epoch_steps(n_items, per_batch, seed, start, total, rank, world):
        if coins[0] != epoch:
            g = torch.Generator().manual_seed(seed * 100_003 + epoch + 50_001)
            coins = (epoch, torch.rand(n_items, generator=g) < 0.5)
        yield [(epoch, i, bool(coins[1][i])) for i in indices]


def random_crops(x0, mask, side, generator, *also):
    """One side x side window per image: uniform for normal images; for synthetic ones placed so that it
    contains a random anomalous pixel, so that a crop rarely misses the anomaly it was made for. Tensors in
    `also` (B,C,H,W) are cropped at the same windows (e.g. the anomaly-free image under each)."""
    H, W = x0.shape[-2:]
    xs, ms, boxes = [], [], []
    for img, m in zip(x0, mask):
        r = torch.rand(3, generator=generator).tolist()
        where = m[0].nonzero()
        if len(where):
            y, x = where[int(r[0] * len(where))].tolist()
            top, left = y - int(r[1] * side), x - int(r[2] * side)
        else:
            top, left = int(r[1] * (H - side + 1)), int(r[2] * (W - side + 1))
        top, left = min(max(top, 0), H - side), min(max(left, 0), W - side)
        xs.append(img[:, top:top + side, left:left + side])
        ms.append(m[:, top:top + side, left:left + side])
        boxes.append((top, left))
    same = [torch.stack([a[:, y:y + side, x:x + side] for a, (y, x) in zip(t, boxes)]) for t in also]
    return (torch.stack(xs), torch.stack(ms), *same)



# ----------------------------------------------------------------------------- built-in synthetic set
class SyntheticSet(Dataset):
    """The built-in set, made in memory, deterministic. Variant "texture": a woven surface; "object": a
    washer with an orientation dot on a plain background, with exact foreground masks. train: 200 normals
    (random phase, orientation, colour, brightness, grain); test: 30 good + 30 anomalous (scratch, spot,
    missing piece, stain: a different process from the training synthesizer), with exact masks."""
    KINDS = ("scratch", "spot", "missing", "stain")

    def __init__(self, split, img_size, variant="texture", foreground="auto", n_train=200, n_test_good=30,
                 n_test_bad=30):
        if variant not in ("texture", "object"):
            raise ValueError(f"unknown synthetic variant {variant!r}: use synthetic/texture or synthetic/object")
        self.split, self.n, self.variant, self.foreground = split, int(img_size), variant, foreground
        self.name, self.category, self.layout = "synthetic", variant, "synthetic"
        self.fg_kind = "texture" if variant == "texture" else "mask"
        self.has_fg_masks = variant == "object"
        self.counts = (n_train, 0) if split == "train" else (n_test_good, n_test_bad)
        self._cache = {}

    def __len__(self):
        return sum(self.counts)

    def _make(self, i):
        """Item i as (uint8 image, defect mask, object mask, defect kind or "")."""
        n = self.n
        rng = np.random.default_rng((5, self.variant == "object", int(self.split == "test"), i))
        y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) / n] * 2, indexing="ij")
        noise = lambda sd: np.float32(sd * 3.46) * (rng.random((n, n, 1), np.float32) - 0.5)   # grain, std sd
        th = rng.uniform(-0.15, 0.15)                       # the weave: two crossing sine gratings
        u, v = x * math.cos(th) + y * math.sin(th), y * math.cos(th) - x * math.sin(th)
        s1, s2 = np.sin(2 * np.pi * 8.0 * u + rng.uniform(0, 7)), np.sin(2 * np.pi * 8.0 * v + rng.uniform(0, 7))
        g = 0.6 + 0.16 * s1 * (s2 > 0) + 0.16 * s2 * (s1 <= 0) + 0.04 * (x - 0.5) * rng.normal()
        colour = (np.array([0.78, 0.62, 0.42]) * rng.uniform(0.9, 1.1) + rng.normal(0, 0.02, 3)).astype(np.float32)
        img = g[..., None] * colour + noise(0.015)
        obj, bg = np.ones((n, n), bool), None
        if self.variant == "object":                        # a washer replaces the weave (drawn all the same)
            bg = 0.18 + 0.02 * y[..., None] + noise(0.01)
            cy, cx = (0.5 + rng.uniform(-0.04, 0.04, 2)).tolist()
            r = np.hypot(y - cy, x - cx)
            obj = (r < 0.32) & (r > 0.1)
            a = rng.uniform(0, 2 * np.pi)                   # orientation marker: a bright dot
            dot = np.hypot(y - cy - 0.21 * math.sin(a), x - cx - 0.21 * math.cos(a)) < 0.03
            metal = (0.55 + 0.25 * np.cos(6 * np.pi * r))[..., None] * np.array([0.8, 0.82, 0.9], np.float32)
            img = np.where(obj[..., None], metal * rng.uniform(0.9, 1.1), bg)
            img[dot] = 0.95
        mask, kind = np.zeros((n, n), bool), ""
        if i >= self.counts[0]:                             # a defect at a random point of the object
            kind = self.KINDS[(i - self.counts[0]) % 4]
            ys, xs = np.nonzero(obj)
            k = int(rng.integers(len(ys)))
            c = [float(ys[k]) / n, float(xs[k]) / n]
            a = rng.uniform(0, np.pi)
            sa, ca = math.sin(a), math.cos(a)
            du, dv = (y - c[0]) * sa + (x - c[1]) * ca, (y - c[0]) * ca - (x - c[1]) * sa
            if kind == "scratch":
                mask = (np.abs(du) < rng.uniform(0.125, 0.25)) & (np.abs(dv) < max(1.0, 0.0125 * n) / n)
            elif kind == "spot":
                mask = (du / rng.uniform(0.04, 0.09)) ** 2 + (dv / rng.uniform(0.04, 0.09)) ** 2 < 1
            elif kind == "missing":
                mask = (np.abs(du) < rng.uniform(0.05, 0.1)) & (np.abs(dv) < rng.uniform(0.03, 0.07))
            else:
                for _ in range(3):
                    o = (c + rng.uniform(-0.06, 0.06, 2)).tolist()
                    mask |= np.hypot(y - o[0], x - o[1]) < rng.uniform(0.04, 0.08)
            mask &= obj                                 # exact: only changed pixels are marked
            if kind == "scratch":
                img[mask] = 0.06 if rng.random() < 0.5 else 0.97
            elif kind == "spot":
                img[mask] = img[mask] * 0.3 + np.array([0.12, 0.08, 0.05])
            elif kind == "missing":
                img[mask] = bg[mask] if self.variant == "object" else 0.04
            else:
                img[mask] *= np.array([1.25, 0.75, 0.45]) if rng.random() < 0.5 else np.array([0.45, 0.7, 1.25])
        return _u8(img), mask, obj, kind

    def _get(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i not in self._cache:
            self._cache[i] = self._make(i)
        return self._cache[i]

    def __getitem__(self, i):
        img, mask, _, kind = self._get(int(i))
        return _item(img.astype(np.float32) / 255, mask.astype(np.float32), int(mask.any()), kind or "good",
                     f"synthetic/{self.variant}/{self.split}/{int(i):04d}")

    def foreground_mask(self, i):
        return self._get(int(i))[2] if self.variant == "object" else None


def resize_tree(src, dst, size):
    """Write a copy of the class folder src at size x size (e.g. to carry a small copy to a GPU machine).
    Loading the copy at that size gives the same pixels as loading src: images are resized as _rgb does
    and stored losslessly (PNG, same stem), masks as defect_mask does; other files are copied."""
    src, dst = Path(src), Path(dst)
    layout = open_layout(src) if src.is_dir() else None
    if layout not in ("mvtec", "visa-1cls", "dagm"):
        raise SystemExit(f"data.py resize: {src} is not an MVTec AD, VisA 1cls or DAGM class folder"
                         + (" (a raw VisA release names its files in a CSV: prepare it as 1cls first)" if layout else ""))
    if dst.exists():
        raise SystemExit(f"data.py resize: {dst} exists; pass a new --out")
    masks = {Path(m) for split in ("train", "test") for _, m, _, _ in open_dataset(src, split, size).records if m}
    for f in sorted(p for p in src.rglob("*") if p.is_file()):
        out = dst / f.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix.lower() not in IMG_EXTS:
            out.write_bytes(f.read_bytes())
            continue
        im = _open(f)
        if f in masks or f.parent.name == "foreground" or "ground_truth" in f.parts:
            a = (defect_mask(im, size)[0] if f in masks else _binary(im, size)) * 255
            im = Image.fromarray(a.astype(np.uint8))
        else:
            a = _rgb(im, size)
            im = Image.fromarray(_u8(a[..., 0] if im.mode in ("1", "L", "LA", "I", "F") or im.mode.startswith("I;16") else a))
        im.save(out if f.suffix.lower() == ".png" else out.with_suffix(".png"), format="PNG")
    print(f"wrote {dst}: {layout} layout at {size} px")


# ----------------------------------------------------------------------------- CLI
def main(argv=None):
    ap = argparse.ArgumentParser(prog="data.py", description="Look at the data DiffusionAD trains on.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("preview", help="write a grid of N | A | M | S rows (paper Fig. 4) as one PNG")
    p.add_argument("--data", required=True, help="ROOT/CLASS or 'synthetic'")
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--n", type=int, default=8, help="rows")
    p.add_argument("--img-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--texture-dir", default=None, help="anomaly source textures (e.g. DTD)")
    p.add_argument("--foreground", default="auto", choices=FOREGROUNDS)
    p.add_argument("--shape", default="perlin", choices=SHAPES, help="anomaly masks (synthesize)")
    p.add_argument("--fill", default="blend", choices=FILLS, help="anomaly content (synthesize)")
    r = sub.add_parser("resize", help="copy a class folder (MVTec AD, VisA 1cls or DAGM layout) at the size the "
                       "loader would resize it to: images bilinear, masks as defect_mask, the rest as it is")
    r.add_argument("--data", required=True, help="ROOT/CLASS")
    r.add_argument("--out", required=True, help="new folder for the copy")
    r.add_argument("--img-size", type=int, default=256)
    args = ap.parse_args(argv)
    if args.cmd == "resize":
        return resize_tree(args.data, args.out, args.img_size)
    try:
        ts = TrainSet(open_dataset(args.data, "train", args.img_size), seed=args.seed,
                      texture_dir=args.texture_dir, foreground=args.foreground, shape=args.shape, fill=args.fill)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"data.py preview: {e}")
    idx = np.random.default_rng(args.seed).choice(len(ts), min(args.n, len(ts)), replace=False)
    gap = np.ones((args.img_size, 4, 3), np.float32)
    rows = []
    for i in idx:
        s = ts.sample(int(i))
        m = np.repeat((0.3 * s["foreground"] + 0.7 * s["mask"])[..., None], 3, axis=2)
        row = [s["image"], gap, s["anomaly"], gap, m, gap, s["synthetic"]]
        rows += [np.concatenate(row, axis=1), np.ones((4, row[0].shape[1] * 4 + 12, 3), np.float32)]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_u8(np.concatenate(rows[:-1]))).save(args.out)
    print(f"wrote {args.out}: {len(idx)} rows of N | A | M | S, foreground '{ts.foreground}'")


if __name__ == "__main__":
    main()
