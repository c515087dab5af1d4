"""The built-in data set (`--data synthetic` or `synthetic/object`): made in memory, deterministic, for the quickstart
and the tests. Its test anomalies come from another process than the training synthesizer's."""
import math
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

import data


class SyntheticSet(Dataset):
    """Variant "texture": a woven surface; "object": a washer with an orientation dot on a plain background, with
    exact foreground masks. train: 200 normal images (random phase, orientation, colour, brightness, grain); test:
    30 good + 30 anomalous (scratch, spot, missing piece, stain), with exact masks."""
    KINDS = ("scratch", "spot", "missing", "stain")

    def __init__(self, split, img_size, variant="texture", n_train=200, n_test_good=30, n_test_bad=30):
        if variant not in ("texture", "object"):
            raise ValueError(f"unknown synthetic variant {variant!r}: use synthetic/texture or synthetic/object")
        if not isinstance(img_size, int):
            raise ValueError(f"the built-in set is square: pass one --img-size, not {img_size}")
        self.split, self.n, self.variant = split, int(img_size), variant
        self.name, self.category, self.layout, self.root = "synthetic", variant, "synthetic", Path("synthetic", variant)
        self.counts = (n_train, 0) if split == "train" else (n_test_good, n_test_bad)
        self.made = {}

    def __len__(self):
        return sum(self.counts)

    def surface(self, rng, y, x):
        """(image (n,n,3), object mask, background or None, grain function) of a normal item."""
        n = self.n
        noise = lambda sd: np.float32(sd * 3.46) * (rng.random((n, n, 1), np.float32) - 0.5)  # grain, std sd
        th = rng.uniform(-0.15, 0.15)  # the weave: two crossing sine gratings
        u, v = x * math.cos(th) + y * math.sin(th), y * math.cos(th) - x * math.sin(th)
        s1, s2 = np.sin(2 * np.pi * 8.0 * u + rng.uniform(0, 7)), np.sin(2 * np.pi * 8.0 * v + rng.uniform(0, 7))
        grey = 0.6 + 0.16 * s1 * (s2 > 0) + 0.16 * s2 * (s1 <= 0) + 0.04 * (x - 0.5) * rng.normal()
        colour = (np.array([0.78, 0.62, 0.42]) * rng.uniform(0.9, 1.1) + rng.normal(0, 0.02, 3)).astype(np.float32)
        img = grey[..., None] * colour + noise(0.015)
        obj, bg = np.ones((n, n), bool), None
        if self.variant == "object":  # a washer replaces the weave (drawn all the same)
            bg = 0.18 + 0.02 * y[..., None] + noise(0.01)
            cy, cx = (0.5 + rng.uniform(-0.04, 0.04, 2)).tolist()
            r = np.hypot(y - cy, x - cx)
            obj = (r < 0.32) & (r > 0.1)
            a = rng.uniform(0, 2 * np.pi)  # orientation marker: a bright dot
            dot = np.hypot(y - cy - 0.21 * math.sin(a), x - cx - 0.21 * math.cos(a)) < 0.03
            metal = (0.55 + 0.25 * np.cos(6 * np.pi * r))[..., None] * np.array([0.8, 0.82, 0.9], np.float32)
            img = np.where(obj[..., None], metal * rng.uniform(0.9, 1.1), bg)
            img[dot] = 0.95
        return img, obj, bg

    def defect(self, rng, y, x, img, obj, bg, kind):
        """Draws a defect of this kind at a random point of the object into img; returns its exact mask."""
        n, mask = self.n, np.zeros((self.n, self.n), bool)
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
        mask &= obj  # exact: only changed pixels are marked
        if kind == "scratch":
            img[mask] = 0.06 if rng.random() < 0.5 else 0.97
        elif kind == "spot":
            img[mask] = img[mask] * 0.3 + np.array([0.12, 0.08, 0.05])
        elif kind == "missing":
            img[mask] = bg[mask] if self.variant == "object" else 0.04
        else:
            img[mask] *= np.array([1.25, 0.75, 0.45]) if rng.random() < 0.5 else np.array([0.45, 0.7, 1.25])
        return mask

    def make(self, i):
        """Item i as (uint8 image, defect mask, object mask, defect kind or ""), made once."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        if i not in self.made:
            n = self.n
            rng = np.random.default_rng((5, self.variant == "object", int(self.split == "test"), i))
            y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) / n] * 2, indexing="ij")
            img, obj, bg = self.surface(rng, y, x)
            kind = self.KINDS[(i - self.counts[0]) % 4] if i >= self.counts[0] else ""
            mask = self.defect(rng, y, x, img, obj, bg, kind) if kind else np.zeros((n, n), bool)
            self.made[i] = data.to_u8(img), mask, obj, kind
        return self.made[i]

    def __getitem__(self, i):
        img, mask, _, kind = self.make(int(i))
        return data.make_item(img.astype(np.float32) / 255, mask.astype(np.float32), int(mask.any()), kind or "good",
                              f"synthetic/{self.variant}/{self.split}/{int(i):04d}")

    def foreground_mask(self, i):
        return self.make(int(i))[2] if self.variant == "object" else None
