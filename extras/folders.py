"""Your own images and ours, beside the paper's data sets (data.py): `--data` as a plain folder of normal images or
`synthetic`, a labelled test folder (`--test`), the images predict reads, and the held-out slice of the training
images that sets the decision threshold (`--holdout`)."""
import csv
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

import data
from extras.synthetic import SyntheticSet

LAYOUTS_TRIED = ("MVTec AD / VisA 1cls (train/good + test/), VisA raw (Data/Images + ../split_csv/1cls.csv), DAGM "
                 "2007 (Train|Test/Label/Labels.txt), a plain folder of normal images, 'synthetic'")


def open_data(path, split, img_size):
    """The train or test split of --data: 'synthetic[/texture|/object]', a class folder of the paper's data sets
    (data.open_dataset), or a plain folder, every image below it normal (its train split; it has no test split)."""
    text = str(path).rstrip("/")
    if text == "synthetic" or text.startswith("synthetic/"):
        return SyntheticSet(split, img_size, text.partition("/")[2] or "texture")
    root = Path(path).expanduser()
    if not root.is_dir() or data.open_layout(root) is not None:
        return data.open_dataset(root, split, img_size)
    classes = find_classes(root)
    if classes:
        raise ValueError(f"{root} holds {len(classes)} classes ({', '.join(p.name for p in classes[:5])}"
                         f"{', ...' if len(classes) > 5 else ''}); pass one class, e.g. {classes[0]}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in data.IMG_EXTS and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))  # hidden folders skipped
    if not files:
        raise ValueError(f"{root}: no image files ({', '.join(sorted(data.IMG_EXTS))}, any case) in it or its "
                         f"subfolders, and no known layout; tried: {LAYOUTS_TRIED}")
    if split == "test":
        raise ValueError(f"{root} is a plain folder of normal images: it has no test split; pass --test TESTDIR (good/ "
                         "and one folder per defect type)")
    return data.ImageDataset([(p, None, 0, "good") for p in files], img_size, root, "folder")


def labelled_folder(path, img_size, masks=None):
    """A labelled test folder: good/ holds normal images, every other folder one defect type (images at any depth
    below it). Masks are optional: <type>/<stem>.png or <type>/<stem>_mask.png under `masks` (default path/masks,
    then not a defect type). An anomalous image without a mask keeps label 1 and has_mask False."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"labelled folder {root} does not exist")
    mask_root = Path(masks).expanduser() if masks else root / "masks"
    if masks and not mask_root.is_dir():
        raise FileNotFoundError(f"mask folder {mask_root} does not exist")
    if not (root / "good").is_dir():
        raise ValueError(f"labelled folder {root} has no good/ folder: put the normal images in {root / 'good'} "
                         "and each defect type in a folder of its own")
    records = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and p != mask_root and not p.name.startswith(".")):
        found = {m.stem.removesuffix("_mask"): m
                 for m in sorted(data.image_files(mask_root / d.name), key=lambda p: p.stem.endswith("_mask"))}
        for p in sorted(f for f in d.rglob("*") if f.suffix.lower() in data.IMG_EXTS and f.is_file()):
            records.append((p, None, 0, "good") if d.name == "good" else (p, found.get(p.stem), 1, d.name))
    if not any(r[2] == 0 for r in records) or not any(r[2] == 1 for r in records):
        raise ValueError(f"labelled folder {root} needs images in good/ and in at least one defect folder")
    return data.ImageDataset(records, img_size, root, "labelled")


def list_images(inputs):
    """Image files and the images found (recursively) in folders, in order; FileNotFoundError names a missing path
    or a folder without images."""
    files = []
    for p in map(Path, inputs):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in data.IMG_EXTS)
            if not found:
                raise FileNotFoundError(f"{p}: no image files ({', '.join(sorted(data.IMG_EXTS))}) in this folder")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    return files


def load_image(path, img_size):
    """An image as the model sees it: float32 (3,S,S) in [0, 1]; errors name the file."""
    return data.chw(data.rgb(data.open_image(path), img_size))


class Subset(Dataset):
    """The items `indices` of a data set, with its attributes (root, layout, category...)."""

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


def holdout_split(ds, fraction, minimum=5):
    """(training part, held-out part) of a train split: ceil(fraction * n) images, at least `minimum`, by a
    permutation with a fixed seed (the same for every run and seed), kept out of training to set the decision
    threshold. fraction 0: (ds, None), the paper's protocol."""
    if fraction <= 0:
        return ds, None
    n = len(ds)
    k = max(math.ceil(fraction * n), minimum)
    if n - k < 2:
        raise ValueError(f"{n} normal training images are too few to hold out {k} for the threshold; "
                         "add images or pass --holdout 0 (then no threshold is stored)")
    held = set(np.random.default_rng(0).permutation(n)[:k].tolist())
    return Subset(ds, [i for i in range(n) if i not in held]), Subset(ds, sorted(held))


def find_classes(root):
    """The class folders of a whole-benchmark root, sorted: a DAGM 2007 root (Class1..Class10), a VisA release
    (split_csv/1cls.csv and its class folders), an MVTec AD / VisA 1cls root (folders with train/ and test/); [] when
    root is no such root (a single class, say)."""
    root = Path(root).expanduser()
    if not root.is_dir() or data.open_layout(root) is not None:
        return []
    csv_path = root / "split_csv" / "1cls.csv"
    if csv_path.is_file():
        with open(csv_path, newline="") as f:
            names = sorted({r.get("object", "") for r in csv.DictReader(f)} - {""})
        return [root / n for n in names if (root / n / "Data" / "Images").is_dir()]
    natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]  # Class2 < Class10
    return sorted((p for p in root.iterdir() if p.is_dir() and data.open_layout(p) is not None), key=natural)


def look(path, n=16):
    """(the median short side, whether they are binarised) of n training images spread over the train split of a
    data set on disk, or of all the classes of a benchmark root together (None, False for the built-in set or anything
    unreadable): the --preset cpu's evidence. Binarised: on most of them at least 95 % of the pixels lie within 10 %
    of the image's darkest or brightest grey (a PCB scan)."""
    try:
        records = [r for c in find_classes(path) or [path] for r in open_data(c, "train", 64).records]
        files = [records[i][0] for i in np.linspace(0, len(records) - 1, min(n, len(records))).astype(int)]
        sides, binary = [], []
        for f in files:
            with Image.open(f) as im:
                a = np.asarray(im.convert("L"), np.float32) / 255
                sides.append(min(im.size))
            lo, hi = a.min(), a.max()
            binary.append(hi - lo > 0.5 and np.mean((a <= lo + 0.1) | (a >= hi - 0.1)) >= 0.95)
        return int(np.median(sides)), sum(binary) > len(binary) / 2
    except Exception:  # the built-in set (no records), a missing or broken folder: the checks say what is wrong
        return None, False


def fitted(width, height, side, multiple):
    """The shape an image of width x height takes at `side`: its short side at side, the long one at the same aspect
    rounded to a multiple of `multiple`; side itself (square) where that rounds to side."""
    long = max(multiple, round(side * max(width, height) / min(width, height) / multiple) * multiple)
    return side if long == side else (side, long) if width >= height else (long, side)


def aspects(ds):
    """(lowest, highest) width / height of a split's image files (their headers alone), rounded to 1e-4; None for a
    set without files (the built-in one) or without a readable image."""
    ratios = []
    for p, *_ in getattr(ds, "records", ()):
        try:
            with Image.open(p) as im:
                ratios.append(im.size[0] / im.size[1])
        except Exception:
            continue  # an unreadable file: the checks before training name it
    return (round(min(ratios), 4), round(max(ratios), 4)) if ratios else None


def image_shape(path, side, multiple):
    """--img-size when none is given: side, or the one shape that every training image of a plain folder or of a
    class in MVTec AD's or DAGM's layout takes at side (fitted) where it is not square. VisA (the paper resizes its
    images to squares), the built-in set and benchmark roots: side. A plain folder of several shapes: ValueError."""
    root = Path(path).expanduser()
    if str(path).startswith("synthetic") or not root.is_dir() or data.open_layout(root) in ("visa-raw", "visa-1cls") \
            or find_classes(root):
        return side
    try:
        records = open_data(root, "train", side).records
    except (FileNotFoundError, ValueError):
        return side  # the checks before training say what is wrong
    shapes = {}
    for p, *_ in records:
        try:
            with Image.open(p) as im:
                shapes.setdefault(fitted(*im.size, side, multiple), []).append(p)
        except Exception:
            continue  # an unreadable file: the checks before training name it
    if len(shapes) == 1:
        return next(iter(shapes))
    if len(shapes) > 1 and data.open_layout(root) is None:
        show = lambda s: f"{s}x{s}" if isinstance(s, int) else f"{s[0]}x{s[1]}"
        examples = ", ".join(f"{len(ps)} at {show(s)} (e.g. {Path(ps[0]).name})" for s, ps in list(shapes.items())[:4])
        raise ValueError(f"{root}: its images have {len(shapes)} different shapes at --img-size {side}: {examples}; "
                         f"pass --img-size HEIGHT,WIDTH to resize every image to one shape ({side},{side}: squares)")
    return side
