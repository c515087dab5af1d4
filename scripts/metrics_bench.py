"""metrics.py's exact PRO against the authors'-style 1000-threshold approximation, and evaluate's time and memory on
1000 maps of 256 x 256 (python scripts/metrics_bench.py)."""
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from metrics import evaluate, pro  # noqa: E402


def naive_pro(masks, maps, n_thresholds=1000, fpr_limit=0.3):
    """The authors'-style PRO, for comparison only: n linearly spaced thresholds from the maximum
    down (score > t), every region's overlap recomputed at every threshold, the FPRs <= limit kept
    and min-max rescaled to [0, 1], then the trapezoid area."""
    maps, masks = np.asarray(maps), np.asarray(masks) > 0.5
    coords = []  # flat pixel indices of each region of each image (labelled once: a favour)
    for k in masks:
        lab = ndimage.label(k, structure=np.ones((3, 3), bool))[0].ravel()
        order = np.argsort(lab, kind="stable")
        coords.append(np.split(order, np.cumsum(np.bincount(lab)))[1:-1])
    normal = ~masks
    lo, hi = float(maps.min()), float(maps.max())
    fprs, pros = [], []
    for t in hi - (hi - lo) * np.arange(n_thresholds) / n_thresholds:
        pred = maps > t
        pros.append(np.mean([p.ravel()[c].mean() for p, cs in zip(pred, coords) for c in cs]))
        fprs.append(np.count_nonzero(pred & normal) / np.count_nonzero(normal))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= fpr_limit
    f, p = fprs[keep], pros[keep]
    return float(np.trapezoid(p, (f - f.min()) / (f.max() - f.min())))  # f is nondecreasing


def bench(n=1000, size=256, n_naive=100, seed=0):
    import resource
    import time

    def timed(f, *args):
        t0 = time.perf_counter()
        return f(*args), time.perf_counter() - t0

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    maps, masks = np.empty((n, size, size), np.float32), np.zeros((n, size, size), bool)
    for i in range(n):  # half the images get 1-3 elliptic blobs; maps look like a segmentation
        for _ in range(rng.integers(1, 4) if i % 2 else 0):  # net's sigmoid output: noise + blobs
            cy, cx, ry, rx = rng.uniform(0, size, 2).tolist() + rng.uniform(3, 30, 2).tolist()
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        noise = ndimage.gaussian_filter(rng.standard_normal((size, size), np.float32), 2)
        blobs = ndimage.gaussian_filter(masks[i].astype(np.float32), 2)
        maps[i] = 1 / (1 + np.exp(6 - 14 * noise - 6 * blobs))  # 14 * noise has std about 2
    labels, scores = masks.any(axis=(1, 2)), maps.max(axis=(1, 2))
    print(f"data: {n} maps of {size}x{size} ({maps.size / 1e6:.1f} M pixels, "
          f"{masks.mean():.1%} anomalous), float32 maps {maps.nbytes / 2**20:.0f} MiB")
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    rss_before = rss()
    res, dt = timed(evaluate, maps, masks, labels, scores)
    print(f"evaluate (exact), {n} images: {dt:.1f} s; process peak RSS (resource.getrusage "
          f"ru_maxrss) {rss_before:.2f} GiB before evaluate, {rss():.2f} GiB after")
    print("  " + ", ".join(f"{k}={v:.4f}" for k, v in res.items()))
    naive, dt_naive = timed(naive_pro, masks[:n_naive], maps[:n_naive])
    exact, dt_exact = timed(pro, masks[:n_naive], maps[:n_naive])
    print(f"naive 1000-threshold PRO, measured on the first {n_naive} images: {dt_naive:.1f} s "
          f"(extrapolated to {n} images: ~{dt_naive * n / n_naive:.0f} s); exact pro on the "
          f"same {n_naive} images: {dt_exact:.2f} s")
    print(f"  PRO on those {n_naive} images: naive (min-max rescaled) {naive:.4f} vs exact {exact:.4f}")


if __name__ == "__main__":
    bench()
