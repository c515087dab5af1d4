"""Exact, fast anomaly-detection metrics: image/pixel AUROC, image/pixel AP, F1-max and PRO.

Standalone (numpy and scipy only) so it can be copied into other projects alone; the tests check it against
scikit-learn and a brute-force PRO.

Definitions
- Image metrics take one score per image, label 1 (or True) = anomalous. Pixel metrics pool all pixels
  of all images; maps and masks are an (N, H, W) array or lists of 2-D arrays whose sizes may differ
  from image to image (map i and mask i have the same shape).
- A mask pixel is anomalous where > 0.5 after scaling to [0, 1]. Bool and float masks are in [0, 1]
  already; an integer mask holding only 0 and 1 is a label mask, any other an 8-bit image (divided by
  255: anomalous where >= 128); integers outside [0, 255] are refused (ambiguous scale).
- AUROC: area under the ROC curve through every distinct score (ties are one threshold, crossed
  diagonally), i.e. the Mann-Whitney statistic with ties counted 1/2. AP is scikit-learn's: sum over
  distinct thresholds of (recall step) * precision.
- PRO (Bergmann et al., MVTec AD): regions are the 8-connected components of each binary mask; at
  threshold t a pixel is predicted anomalous when its score >= t; PRO(t) is the mean over all regions of
  all images of the fraction of the region predicted anomalous; FPR(t) is over all normal pixels of all
  images, defect-free ones included. The curve through (0, 0), every distinct score and (1, 1) is
  integrated with the trapezoid rule up to FPR = fpr_limit (the point at the limit linearly
  interpolated) and divided by fpr_limit, so a perfect map scores 1.0.

Known traps, and the decision taken for each
- The authors' evaluation samples 1000 linearly spaced thresholds and min-max rescales the kept FPRs
  instead of dividing by the limit. That is biased; this file computes the exact definition above.
  (scripts/metrics_bench.py prints both. In our trials the bias was downward: chords of a coarse grid fall
  under a concave curve and the average stops at the last sampled FPR.)
- No anomalous pixel / no normal pixel / one class of image labels: the metric is undefined. The
  single-metric functions raise UndefinedMetricError (a ValueError); `evaluate` reports NaN with a
  warning and returns the metrics that are defined. Never a silent 0.5.
- NaN or inf in a map or score, map/mask shape mismatch: ValueError naming the index (and both shapes).
- Ties: equal scores are a single threshold, for AUROC, AP and PRO alike.
- Speed: PRO(t) = sum over anomalous pixels with score >= t of 1 / (n_regions * area of their region),
  so every curve is a cumulative sum in score order. The normal scores are sorted by value once (a fast
  SIMD sort, not an 8-byte-per-pixel argsort of all P pixels) and only the anomalous ones argsorted;
  binary search counts the normals at each threshold. O(P log P) time, about one extra copy of the maps
  in memory. Maps keep their float precision (integers become float64, or float32 where that is exact).
"""
import warnings

import numpy as np
from scipy import ndimage

__all__ = ["image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap", "pixel_f1_max", "pro",
           "evaluate", "UndefinedMetricError"]


class UndefinedMetricError(ValueError):
    """The metric is undefined for this data (for example no anomalous pixel)."""


# ---------------------------------------------------------------- input checking and pooling
def _image_list(arrays, name):
    """(N, H, W) array or sequence of 2-D arrays -> list of 2-D arrays (views, no copies)."""
    if isinstance(arrays, np.ndarray) and arrays.ndim != 3:
        raise ValueError(f"{name}: expected an (N, H, W) array or a list of 2-D arrays, "
                         f"got an array of shape {arrays.shape}")
    out = [np.asarray(a) for a in arrays]
    for i, a in enumerate(out):
        if a.ndim != 2:
            raise ValueError(f"{name}[{i}]: expected a 2-D array, got shape {a.shape}")
    return out


def _binarise(mask, i):
    """Mask -> bool array, anomalous where > 0.5 after scaling to [0, 1] (see module docstring)."""
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        lo, hi = (int(mask.min()), int(mask.max())) if mask.size else (0, 0)
        if lo < 0 or hi > 255:
            raise ValueError(f"masks[{i}]: integer values must lie in [0, 255] (0/1 or 8-bit), "
                             f"got range [{lo}, {hi}]; pass a bool or [0, 1] float mask")
        return mask > (0 if hi <= 1 else 127)
    if np.issubdtype(mask.dtype, np.floating):
        if not np.isfinite(mask).all():
            raise ValueError(f"masks[{i}] contains NaN or inf")
        return mask > 0.5
    raise ValueError(f"masks[{i}]: unsupported dtype {mask.dtype}")


def _pixel_data(masks, maps, regions):
    """Pool pixels -> (sorted normal scores, anomalous scores, anomalous weights or None).

    With regions=True the weight of an anomalous pixel is 1 / (n_regions * area of its region)."""
    maps, masks = _image_list(maps, "maps"), _image_list(masks, "masks")
    if len(maps) != len(masks):
        raise ValueError(f"got {len(maps)} maps but {len(masks)} masks")
    dtype = np.result_type(np.float32, *(m.dtype for m in maps))
    if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"maps: unsupported dtype {dtype}")
    # Pass 1: validate everything and count normal pixels, before any heavy allocation.
    binary, n_neg = [], 0
    for i, (m, k) in enumerate(zip(maps, masks)):
        if m.shape != k.shape:
            raise ValueError(f"maps[{i}] has shape {m.shape} but masks[{i}] has shape {k.shape}")
        if not np.isfinite(m).all():
            raise ValueError(f"maps[{i}] contains NaN or inf")
        binary.append(_binarise(k, i))
        n_neg += binary[-1].size - np.count_nonzero(binary[-1])
    # Pass 2: normal scores into one preallocated buffer; anomalous scores (+ region ids) in lists.
    neg, pos, ids = np.empty(n_neg, dtype), [], []
    start, n_regions = 0, 0
    eight = np.ones((3, 3), bool)  # 8-connectivity
    for m, b in zip(maps, binary):
        normal = m[~b]
        neg[start:start + normal.size] = normal
        start += normal.size
        pos.append(m[b].astype(dtype, copy=False))
        if regions:
            lab, n = ndimage.label(b, structure=eight)
            ids.append(lab[b].astype(np.int32) + (n_regions - 1))  # global ids from 0
            n_regions += n
    neg.sort()
    pos = np.concatenate(pos) if pos else np.empty(0, dtype)
    weights = None
    if regions and pos.size:
        ids = np.concatenate(ids)
        weights = 1.0 / (n_regions * np.bincount(ids)[ids])
    return neg, pos, weights


def _image_data(labels, scores):
    """Image labels and scores -> (sorted normal scores, anomalous scores)."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"labels and scores must be 1-D of equal length, "
                         f"got shapes {labels.shape} and {scores.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous)")
    bad = np.flatnonzero(~np.isfinite(scores))
    if bad.size:
        raise ValueError(f"scores[{bad[0]}] is {scores[bad[0]]}")
    labels = labels.astype(bool)
    return np.sort(scores[~labels]), scores[labels]


# ---------------------------------------------------------------- curves
def _steps(neg, pos, weights, what):
    """One row per distinct anomalous score v, from the highest down:
    cumulative weight and count of anomalous pixels >= v, and normal counts > v and >= v."""
    unit = what.split("_")[0]  # "image" or "pixel"
    if pos.size == 0:
        raise UndefinedMetricError(f"{what} is undefined: there is no anomalous {unit}")
    if neg.size == 0:
        raise UndefinedMetricError(f"{what} is undefined: there is no normal {unit}")
    order = np.argsort(pos, kind="stable")[::-1]
    v = pos[order]
    ends = np.append(np.flatnonzero(v[1:] != v[:-1]), v.size - 1)  # last index of each tie group
    w = np.full(v.size, 1.0 / v.size) if weights is None else weights[order]
    cum_w, cum_n, v = np.cumsum(w)[ends], ends + 1.0, v[ends]
    neg_gt = neg.size - np.searchsorted(neg, v, side="right")
    neg_ge = neg.size - np.searchsorted(neg, v, side="left")
    return cum_w, cum_n, neg_gt, neg_ge


def _area(neg, pos, weights, limit, what):
    """Normalised area under the (FPR, cumulative weight) curve up to FPR = limit."""
    cum_w, _, neg_gt, neg_ge = _steps(neg, pos, weights, what)
    # Curve: (0,0); per group (FPR before its normals enter, previous y), (FPR after, its y); (1,1).
    x = np.concatenate(([0.0], np.column_stack((neg_gt, neg_ge)).ravel() / neg.size, [1.0]))
    y = np.concatenate(([0.0], np.column_stack((np.r_[0.0, cum_w[:-1]], cum_w)).ravel(), [1.0]))
    k = np.searchsorted(x, limit, side="right")  # points with x <= limit
    if x[k - 1] < limit:  # linearly interpolate the point at the limit (then x[k] > limit)
        y_lim = y[k - 1] + (y[k] - y[k - 1]) * (limit - x[k - 1]) / (x[k] - x[k - 1])
        x, y = np.r_[x[:k], limit], np.r_[y[:k], y_lim]
    else:
        x, y = x[:k], y[:k]
    return float(np.trapezoid(y, x) / limit)


def _ap(neg, pos, what):
    """Average precision: sum over thresholds of (recall step) * precision, as scikit-learn."""
    _, tp, _, fp = _steps(neg, pos, None, what)
    recall_step = np.diff(np.r_[0.0, tp]) / pos.size
    return float(np.sum(recall_step * tp / (tp + fp)))


def _f1_max(neg, pos, what):
    """The best F1 over every threshold (score >= t is anomalous): 2 TP / (TP + FP + positives)."""
    _, tp, _, fp = _steps(neg, pos, None, what)
    return float(np.max(2 * tp / (tp + fp + pos.size)))


# ---------------------------------------------------------------- public API
def image_auroc(labels, scores):
    """ROC AUC of image scores (label 1 = anomalous)."""
    return _area(*_image_data(labels, scores), None, 1.0, "image_auroc")


def image_ap(labels, scores):
    """Average precision of image scores (label 1 = anomalous)."""
    return _ap(*_image_data(labels, scores), "image_ap")


def image_f1_max(labels, scores):
    """F1-max of image scores: the best F1 over every threshold."""
    return _f1_max(*_image_data(labels, scores), "image_f1_max")


def pixel_f1_max(masks, maps):
    """F1-max over all pixels of all images pooled."""
    neg, pos, _ = _pixel_data(masks, maps, regions=False)
    return _f1_max(neg, pos, "pixel_f1_max")


def pixel_auroc(masks, maps):
    """ROC AUC over all pixels of all images pooled."""
    neg, pos, _ = _pixel_data(masks, maps, regions=False)
    return _area(neg, pos, None, 1.0, "pixel_auroc")


def pixel_ap(masks, maps):
    """Average precision over all pixels of all images pooled."""
    neg, pos, _ = _pixel_data(masks, maps, regions=False)
    return _ap(neg, pos, "pixel_ap")


def pro(masks, maps, fpr_limit=0.3):
    """Exact normalised area under the PRO curve up to fpr_limit (MVTec AD definition)."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    neg, pos, weights = _pixel_data(masks, maps, regions=True)
    return _area(neg, pos, weights, fpr_limit, "pixel_pro")


def evaluate(maps, masks, labels, scores, fpr_limit=0.3, defects=None, pixel_images=None):
    """All metrics in one pass over the pixels -> dict keyed as in the paper's tables. With defects (one
    name per image, "good" for normal ones) also "image_auroc_per_defect": {type: AUROC of good vs type}.
    pixel_images: one bool per image, whether its mask is known (default: all); pixel metrics pool those
    images only, and are None when no anomalous image has a known mask.

    Invalid input raises ValueError; an undefined metric is NaN with a RuntimeWarning."""
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    if len(maps) != len(labels):
        raise ValueError(f"got {len(maps)} maps but {len(labels)} labels")
    img = _image_data(labels, scores)
    known = np.ones(len(maps), bool) if pixel_images is None else np.asarray(pixel_images, bool)
    if known.shape != (len(maps),):
        raise ValueError(f"got {known.size} pixel_images flags for {len(maps)} maps")
    pixels = pixel_images is None or (np.asarray(labels)[known] == 1).any()  # some anomalous image has a mask
    if pixels and not known.all():
        maps, masks = [maps[i] for i in np.flatnonzero(known)], [masks[i] for i in np.flatnonzero(known)]
    if pixels:
        neg, pos, weights = _pixel_data(masks, maps, regions=True)
    jobs = {"image_auroc": lambda: _area(*img, None, 1.0, "image_auroc"),
            "image_ap": lambda: _ap(*img, "image_ap"),
            "image_f1_max": lambda: _f1_max(*img, "image_f1_max"),
            "pixel_f1_max": lambda: _f1_max(neg, pos, "pixel_f1_max"),
            "pixel_auroc": lambda: _area(neg, pos, None, 1.0, "pixel_auroc"),
            "pixel_ap": lambda: _ap(neg, pos, "pixel_ap"),
            "pixel_pro": lambda: _area(neg, pos, weights, fpr_limit, "pixel_pro")}
    out = {}
    for key, job in jobs.items():
        if key.startswith("pixel") and not pixels:
            out[key] = None
            continue
        try:
            out[key] = job()
        except UndefinedMetricError as e:
            warnings.warn(f"{e}; reporting NaN", RuntimeWarning, stacklevel=2)
            out[key] = float("nan")
    if defects is not None:
        defects, scores = np.asarray(defects), np.asarray(scores)
        if defects.shape != scores.shape:
            raise ValueError(f"got {len(defects)} defect names for {len(scores)} scores")
        good = defects == "good"
        out["image_auroc_per_defect"] = {d: _area(np.sort(scores[good]).astype(np.float64), scores[defects == d].astype(np.float64),
                                                  None, 1.0, "image_auroc") if good.any() else float("nan")
                                         for d in sorted(set(defects.tolist()) - {"good"})}
    return out
