"""Mean ± standard deviation over seeds, one markdown row per group of run folders.

python scripts/seeds.py [--file metrics.json] NAME=RUN,RUN,... [NAME=...]
Reads FILE (default metrics.json; e.g. eval_ckpt_pcb_t100+200.json for another evaluation) in each run
folder and prints, per group: seeds, image AUROC, pixel AUROC, PRO, image F1-max, the reliance on the
restoration (image AUROC / pixel AUROC / PRO drop with x0_hat := x0), restoration PSNR at each time step
(DRAEM+: of its reconstruction), training minutes and test images/s. Sample standard deviation (n - 1).
Then, where the runs store a threshold, its verdicts on the test split for every rule (extras/thresholds.py): the
good and the anomalous images flagged, the image F1 at the threshold, and the split's image F1-max.
"""
import argparse
import json
from pathlib import Path

import numpy as np


def fmt(values, scale=100.0):
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    v = np.array(v, float) * scale
    return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}" if len(v) > 1 else f"{v[0]:.1f}"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", default="metrics.json")
    p.add_argument("groups", nargs="+", help="NAME=RUN,RUN,...")
    args = p.parse_args()
    print("| method | seeds | Image AUROC | Pixel AUROC | PRO | Image F1-max | reliance: image AUROC | pixel AUROC "
          "| PRO | PSNR (dB) | train min | FPS |")
    print("|---" * 12 + "|")
    groups = {name: [json.loads((Path(r) / args.file).read_text()) for r in runs.split(",")]
              for name, runs in (g.split("=", 1) for g in args.groups)}
    for name, ms in groups.items():
        rel = lambda k: fmt([m.get("reliance", {}).get(k) for m in ms])
        ts = list(ms[0].get("restoration_psnr_good", {}))
        psnr = ", ".join(f"{'t=' * t.isdigit()}{t} {fmt([m['restoration_psnr_good'][t] for m in ms], 1.0)}"
                         for t in ts) or "-"
        train = fmt([m.get("train_seconds") for m in ms], 1 / 60)
        print(f"| {name} | {len(ms)} | " + " | ".join(fmt([m.get(k) for m in ms]) for k in
              ("image_auroc", "pixel_auroc", "pixel_pro", "image_f1_max"))
              + f" | {rel('image_auroc')} | {rel('pixel_auroc')} | {rel('pixel_pro')} | {psnr} | {train} | "
              f"{fmt([m.get('fps') for m in ms], 1.0)} |")
    verdicts(groups)


def verdicts(groups):
    """The second table: each group's (name: its runs' results) verdicts of each threshold rule, stored first."""
    rows = []
    for name, ms in groups.items():
        flagged = [m.get("flagged") for m in ms]
        if not all(flagged):
            continue
        stored = flagged[0].get("rule", "quantile")
        for rule in [stored] + [r for r in flagged[0].get("by_rule", {}) if r != stored]:
            v = [f.get("by_rule", {}).get(rule, f if rule == stored else {}) for f in flagged]  # missing: "-"
            rows.append(f"| {name} | {rule}{' (stored)' * (rule == stored)} | " + " | ".join(
                fmt([x.get(k) for x in v]) for k in ("good", "anomalous", "f1"))
                + f" | {fmt([f.get('image_f1_max') for f in flagged])} |")
    if rows:
        print("\n| method | threshold rule | good flagged | anomalous flagged | image F1 at it | image F1-max |")
        print("|---" * 6 + "|")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
