"""Our options for the anomaly synthesizer (data.synthesize), beside the paper's Perlin blobs and blend, each measured
in docs/RESULTS.md: masks of thin curves (`--anomaly-shape curves|mixed`) or of small PCB-sized marks (`small`), the
other material of a binarised image (`--anomaly-fill invert`); the foreground F of a class without the authors' mask
files (`--foreground`); training crops that keep the anomaly (`--crop`); and the TrainSet of a run's options.
"""
import math
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

import data

SHAPES = ("perlin", "curves", "mixed", "small")
FILLS = ("blend", "invert")
FOREGROUNDS = ("auto", "mask", "texture", "object", "none")
TEXTURE_CLASSES = {"carpet", "grid", "leather", "tile", "wood", "zipper"}  # the authors' texture_list (zipper too)
OBJECT_CLASSES = {"bottle", "cable", "capsule", "hazelnut", "metal_nut", "pill", "screw", "toothbrush", "transistor",
                  "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2",
                  "pcb3", "pcb4", "pipe_fryum"}


# ----------------------------------------------------------------------------- anomaly shapes and fills
def curves_mask(H, W, rng, lengths=(0.08, 0.3), count=(1, 4)):
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


def small_mask(H, W, rng, k=4):
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


def curves(fg, rng):
    """--anomaly-shape curves: (M, None), curves_mask inside fg (10 tries), or None (the caller's Perlin mask)."""
    for _ in range(10):
        M = curves_mask(*fg.shape, rng) & fg
        if M.any():
            return M, None
    return None


def mixed(fg, rng):
    """--anomaly-shape mixed: curves or Perlin blobs with equal chance."""
    return curves(fg, rng) if rng.random() < 0.5 else None


def small(fg, rng):
    """--anomaly-shape small: (M, soft M), M where small_mask reaches 0.5 inside fg (10 tries; S takes its soft
    edges), or None (Perlin)."""
    for _ in range(10):
        soft = small_mask(*fg.shape, rng) * fg
        M = soft >= 0.5
        if M.any():
            return M, soft
    return None


def invert(N, rng):
    """--anomaly-fill invert: A = 1 - N, beta = 0, so S = 1 - N inside M: the other material of a binarised image
    (a PCB scan), never a grey blend."""
    return 1 - N, 0.0


SHAPE = {"perlin": None, "curves": curves, "mixed": mixed, "small": small}  # None: the paper's
FILL = {"blend": None, "invert": invert}


# ----------------------------------------------------------------------------- the foreground F
def otsu(v):
    h, edges = np.histogram(v, bins=64, range=(0, 1))
    w0 = np.cumsum(h)[:-1].astype(np.float64)
    mids = (edges[:-1] + edges[1:]) / 2
    m0 = np.cumsum(h * mids)[:-1]
    w1, total = h.sum() - w0, (h * mids).sum()
    between = np.where((w0 > 0) & (w1 > 0), (total * w0 - m0 * h.sum()) ** 2 / np.maximum(w0 * w1, 1), 0)
    return float(edges[1:][np.argmax(between)])


def estimate_foreground(img):
    """(foreground, border_is_uniform): colour distance to the median border colour > Otsu threshold."""
    b = max(1, min(img.shape[:2]) // 16)
    ring = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3),
                           img[:, :b].reshape(-1, 3), img[:, -b:].reshape(-1, 3)])
    ref = np.median(ring, axis=0)
    d = np.abs(img - ref).max(axis=2)
    fg = d > max(otsu(d), 0.05)
    fg = ndimage.binary_fill_holes(ndimage.binary_opening(fg, np.ones((3, 3), bool), iterations=2))
    return fg, float(np.quantile(np.abs(ring - ref).max(axis=1), 0.9)) < 0.08


class Rectangle:
    """F of a texture class: a random part of the authors' CLASS/thresh/ masks when there are any (data.TextureParts;
    theirs reads carpet's for every texture class), else a random rectangle, sides 50-100 % of the image (ours)."""
    fixed = False

    def __init__(self, parts=None):
        self.parts = parts

    def __call__(self, i, N, rng):
        part = self.parts(i, N, rng) if self.parts else None
        if part is not None and part.mean() >= 0.005:
            return part
        H, W = N.shape[:2]
        h, w = int(rng.integers(H // 2, H + 1)), int(rng.integers(W // 2, W + 1))
        y, x = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        fg = np.zeros((H, W), bool)
        fg[y:y + h, x:x + w] = True
        return fg


class Estimated:
    """F of an object without mask files: estimate_foreground of the image (ours; the authors' code needs masks)."""
    fixed = True

    def __call__(self, i, N, rng):
        return estimate_foreground(N)[0]


class GivenMasks:
    """F from a data set that knows its objects' masks (the built-in synthetic objects)."""
    fixed = True

    def __init__(self, ds):
        self.ds = ds

    def __call__(self, i, N, rng):
        return self.ds.foreground_mask(i)


def guess_kind(normal):
    """object if on most of 8 training images the border is uniform and the estimate covers 3-90 %, else texture."""
    votes = []
    for i in np.linspace(0, len(normal) - 1, min(8, len(normal))).astype(int):
        fg, uniform = estimate_foreground(normal[int(i)]["image"].numpy().transpose(1, 2, 0))
        votes.append(uniform and 0.03 < fg.mean() < 0.9)
    return "object" if sum(votes) > len(votes) / 2 else "texture"


def foreground(normal, kind, size):
    """(kind, F for data.TrainSet) of a train split. auto: mask when the class has one mask file per image (its
    foreground/ or the authors' DISthresh/good/), texture for texture classes and DAGM (thresh/ masks or rectangles),
    object for the other MVTec AD and VisA classes (estimated), any other class by guess_kind; none: the whole image."""
    synthetic = normal.layout == "synthetic"
    folder = None if synthetic else data.foreground_folder(normal.root)
    has_masks = normal.variant == "object" if synthetic else folder is not None
    if kind == "auto":
        name = normal.category.lower()
        kind = ("mask" if has_masks else "texture" if synthetic or normal.layout == "dagm" or name in TEXTURE_CLASSES
                else "object" if name in OBJECT_CLASSES else guess_kind(normal))
    if kind == "mask" and not has_masks:
        raise ValueError(f"--foreground mask but {normal.root} has no foreground masks (expected CLASS/foreground/"
                         "<image stem>.png or CLASS/DISthresh/good/<image stem>.png)")
    if kind == "mask":
        return kind, GivenMasks(normal) if synthetic else data.ForegroundFiles(folder, [r[0] for r in normal.records],
                                                                                size)
    if kind == "texture":
        parts = [] if synthetic else data.image_files(normal.root / "thresh")
        return kind, Rectangle(data.TextureParts(parts, size) if parts else None)
    return kind, Estimated() if kind == "object" else None


def trainset(normal, cfg, opts):
    """data.TrainSet of a run: its foreground, anomaly source textures (--texture-dir, searched recursively: texture
    classes always, others half of the time), anomaly shape and fill. ValueError / FileNotFoundError for bad input."""
    kind, fg = foreground(normal, cfg.foreground, cfg.img_size)
    textures = []
    if cfg.texture_dir:
        if not Path(cfg.texture_dir).is_dir():
            raise FileNotFoundError(f"texture folder {cfg.texture_dir} does not exist")
        textures = sorted(p for p in Path(cfg.texture_dir).rglob("*") if p.suffix.lower() in data.IMG_EXTS)
        if not textures:
            raise ValueError(f"texture folder {cfg.texture_dir} contains no images")
    ts = data.TrainSet(normal, cfg.seed, fg, textures, kind == "texture", SHAPE[opts.anomaly_shape],
                       FILL[opts.anomaly_fill])
    ts.kind = kind
    return ts


# ----------------------------------------------------------------------------- training crops (--crop)
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
