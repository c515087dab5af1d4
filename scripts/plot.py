"""Line charts with PIL alone (no plotting dependency), for the README's curves.

python scripts/plot.py loss RUN/log.csv OUT.png          # training losses against the step
Import `chart` to draw any series: {name: (xs, ys, optional spread)}, mean lines with +-spread bands.
"""
import csv
import sys

from PIL import Image, ImageDraw

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf", "#7f7f7f"]


def chart(series, title, xlabel, ylabel, path, size=(560, 360), ylim=None, xlog=False, ylog=False):
    """series: {name: (xs, ys) or (xs, ys, spreads)}. Writes a PNG with axes, ticks and a legend."""
    import math
    W, H = size
    left, right, top, bottom = 56, 150, 28, 40
    fx = (lambda v: math.log10(v)) if xlog else (lambda v: v)
    fy = (lambda v: math.log10(max(v, 1e-12))) if ylog else (lambda v: v)
    xs = [fx(x) for s in series.values() for x in s[0]]
    ys = [fy(y + d * k) for s in series.values() for y, d in zip(s[1], s[2] if len(s) > 2 else [0] * len(s[1]))
          for k in (-1, 1)]
    x0, x1 = min(xs), max(xs)
    y0, y1 = [fy(v) for v in ylim] if ylim else (min(ys), max(ys))
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    px = lambda x: left + (fx(x) - x0) / (x1 - x0) * (W - left - right)
    py = lambda y: top + (1 - (fy(y) - y0) / (y1 - y0)) * (H - top - bottom)
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for k in range(6):  # ticks
        yv = y0 + (y1 - y0) * k / 5
        yt = 10 ** yv if ylog else yv
        d.line([left - 4, py(yt), left, py(yt)], fill="black")
        d.text((4, py(yt) - 6), f"{yt:.3g}", fill="black")
        xv = x0 + (x1 - x0) * k / 5
        xt = 10 ** xv if xlog else xv
        d.line([px(xt), H - bottom, px(xt), H - bottom + 4], fill="black")
        d.text((px(xt) - 12, H - bottom + 6), f"{xt:.4g}", fill="black")
    d.text((left, 8), title, fill="black")
    d.text(((W - right + left) // 2 - 3 * len(xlabel), H - 16), xlabel, fill="black")
    d.text((4, top - 20), ylabel, fill="black")
    for i, (name, s) in enumerate(series.items()):
        c = COLOURS[i % len(COLOURS)]
        pts = [(px(x), py(y)) for x, y in zip(s[0], s[1])]
        if len(s) > 2:  # +-spread as whiskers
            for x, y, sd in zip(s[0], s[1], s[2]):
                d.line([px(x), py(y - sd), px(x), py(y + sd)], fill=c)
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        for x, y in pts:
            d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=c)
        d.line([W - right + 8, top + 8 + 16 * i, W - right + 24, top + 8 + 16 * i], fill=c, width=2)
        d.text((W - right + 28, top + 2 + 16 * i), name, fill="black")
    im.save(path)
    print(f"wrote {path}")


def loss_chart(log_csv, path, every=20):
    """The losses of a run's log.csv, averaged over windows of `every` steps."""
    rows = list(csv.DictReader(open(log_csv)))
    series = {}
    for key in ("loss", "noise", "mask", "rec"):
        vals = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
        if vals:
            win = [vals[i:i + every] for i in range(0, len(vals), every)]
            series[key] = ([w[-1][0] for w in win], [sum(v for _, v in w) / len(w) for w in win])
    chart(series, f"training losses, means over {every} steps", "step", "loss (log scale)", path, ylog=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "loss":
        loss_chart(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit("usage: python scripts/plot.py loss RUN/log.csv OUT.png")
