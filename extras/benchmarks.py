"""Whole benchmarks: a root (VisA, MVTec AD, DAGM 2007) trains every class in turn into runs/<root name>/<class>/
(spread over the ranks under torchrun), and its table sets each class and the mean beside the paper's Tables 1, 2
and 5 (`python diffusionad.py table runs/<root name>`)."""
import csv
import fcntl
import io
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from extras.checkpoints import atomic_write, run_folder
from extras.distributed import torchrun_env
from extras.reports import COLUMNS


# The paper's numbers (arXiv 2303.08730), in %, per class: (DiffusionAD, the best other method in the same
# table, its number). VisA image AUROC: Table 1; VisA PRO: Table 2; DAGM image AUROC: Table 5. "mean" is the
# paper's own average over all classes of the benchmark. Ties name every method that reaches the number.
PAPER = {
    "visa": {
        "candle": {"image_auroc": (94.9, "PatchCore", 98.6), "pixel_pro": (94.7, "PaDiM", 95.7)},
        "capsules": {"image_auroc": (96.4, "CFLOW", 93.0), "pixel_pro": (97.6, "PatchCore", 85.5)},
        "cashew": {"image_auroc": (92.5, "RD4AD", 99.6), "pixel_pro": (88.0, "PatchCore", 94.5)},
        "chewinggum": {"image_auroc": (99.2, "CFA/RD4AD", 99.7), "pixel_pro": (87.0, "SPADE", 93.9)},
        "fryum": {"image_auroc": (97.8, "DRAEM", 97.4), "pixel_pro": (96.8, "DRAEM", 93.1)},
        "macaroni1": {"image_auroc": (99.3, "CFA", 98.9), "pixel_pro": (96.8, "DRAEM", 96.7)},
        "macaroni2": {"image_auroc": (98.9, "RD4AD", 97.6), "pixel_pro": (98.0, "PatchCore", 94.4)},
        "pcb1": {"image_auroc": (99.1, "PatchCore", 98.5), "pixel_pro": (96.9, "PatchCore", 94.3)},
        "pcb2": {"image_auroc": (99.2, "PatchCore", 97.3), "pixel_pro": (92.8, "PatchCore", 89.2)},
        "pcb3": {"image_auroc": (98.6, "CFLOW", 99.6), "pixel_pro": (94.4, "PatchCore", 90.9)},
        "pcb4": {"image_auroc": (98.6, "PatchCore", 99.6), "pixel_pro": (95.5, "PatchCore", 90.1)},
        "pipe_fryum": {"image_auroc": (98.9, "PatchCore", 99.8), "pixel_pro": (80.2, "PatchCore", 95.7)},
        "mean": {"image_auroc": (97.8, "RD4AD", 96.0), "pixel_pro": (93.2, "PatchCore", 91.2)},
    },
    "dagm": {
        "Class1": {"image_auroc": (99.9, "RD4AD", 99.4)},
        "Class2": {"image_auroc": (100.0, "PatchCore/RD4AD", 100.0)},
        "Class3": {"image_auroc": (100.0, "PaDiM", 99.0)},
        "Class4": {"image_auroc": (100.0, "CFA/DRAEM/PaDiM/PatchCore/RD4AD", 100.0)},
        "Class5": {"image_auroc": (100.0, "DRAEM", 100.0)},
        "Class6": {"image_auroc": (100.0, "CFA/DRAEM/RD4AD", 100.0)},
        "Class7": {"image_auroc": (100.0, "CFA/CutPaste/PatchCore/RD4AD", 100.0)},
        "Class8": {"image_auroc": (100.0, "DRAEM", 99.4)},
        "Class9": {"image_auroc": (96.1, "CFA", 100.0)},
        "Class10": {"image_auroc": (100.0, "PatchCore", 100.0)},
        "mean": {"image_auroc": (99.6, "RD4AD", 95.8)},
    },
}
VISA = {"candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
        "pcb4", "pipe_fryum"}


def benchmark_of(names):
    if names and all(n.startswith("Class") and n[5:].isdigit() for n in names):
        return "dagm"
    return "visa" if names and set(names) <= VISA else "other"


def table(folder):
    """The table of a benchmark's run folder (one subfolder per class with metrics.json from training):
    one row per class, the mean row last; where the paper has the class (PAPER), its DiffusionAD number, our
    difference and the best other method's number. The mean row compares with the mean of the paper's
    numbers over the same classes (the best other method only when every class is there). Unfinished
    classes are listed, not dropped. Returns (markdown, csv text)."""
    folder = Path(folder)
    listing = folder / "benchmark.json"  # written by diffusionad.py: every class of the benchmark
    names = set(json.loads(listing.read_text())["classes"]) if listing.is_file() else set()
    names |= {p.name for p in folder.iterdir() if p.is_dir() and (p / "config.json").is_file()}
    runs = [folder / n for n in sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])]
    paper = PAPER.get(benchmark_of([p.name for p in runs]), {})
    p_keys = [k for k in ("image_auroc", "pixel_pro") if any(k in v for v in paper.values())]
    label = dict((k, c) for c, k in COLUMNS)
    head = ["Class"] + [c for c, _ in COLUMNS] + ["FPS", "Train min"]
    head += [h for k in p_keys for h in (f"Paper {label[k]}", "Diff", f"Best other {label[k]}")]
    rows, done = [], {}
    for run in runs:
        m = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else None
        if m is None or m.get("image_auroc") is None:
            lines = (run / "log.csv").read_text().splitlines() if (run / "log.csv").is_file() else []
            state = f"unfinished (step {lines[-1].split(',')[0]})" if len(lines) > 1 else \
                "not started" if (run / "config.json").is_file() else "missing (no run; see the train output)"
            rows.append([run.name, state if m is None else "no test metrics"] + [""] * (len(head) - 2))
            continue
        done[run.name] = m
        rows.append(table_row(run.name, m, paper.get(run.name, {}), p_keys))
    if done:
        mean = {k: float(np.mean([m[k] for m in done.values() if m.get(k) is not None] or [np.nan]))
                for k in [k for _, k in COLUMNS] + ["fps", "train_seconds"]}
        ref = {}
        for k in p_keys:  # the paper's mean over the classes we have; its best other method only over all of them
            have = [paper[c][k][0] for c in done if k in paper.get(c, {})]
            if have:
                whole = set(done) >= set(paper) - {"mean"}
                ref[k] = (float(np.mean(have)),) + (paper["mean"][k][1:] if whole else (None, None))
        name = "mean" if len(done) == len(runs) else f"mean of {len(done)}/{len(runs)}"
        rows.append(table_row(name, mean, ref, p_keys))
    md = "\n".join("| " + " | ".join(r) + " |" for r in [head, ["---"] * len(head)] + rows)
    text = io.StringIO()
    csv.writer(text).writerows([head] + rows)
    return md + "\n", text.getvalue()


def table_row(name, m, paper, p_keys):
    pct = lambda v: "-" if v is None or v != v else f"{100 * v:.1f}"
    row = [name] + [pct(m.get(k)) for _, k in COLUMNS]
    row += [f"{m['fps']:.1f}" if m.get("fps") is not None else "-",
            f"{m['train_seconds'] / 60:.1f}" if m.get("train_seconds") is not None else "-"]
    for k in p_keys:
        ours = m.get(k)
        if k not in paper:
            row += ["-", "-", "-"]
            continue
        value, other, other_value = paper[k]
        row += [f"{value:.1f}", f"{round(100 * ours - value, 1) + 0.0:+.1f}" if ours is not None and ours == ours else "-",
                f"{other_value:.1f} ({other})" if other else "-"]
    return row


def train_benchmark(cfg, opts, classes, train):
    """train() and the final evaluation for every class of a benchmark root, one run folder each under
    runs/<root name>/<class>/. Finished classes are skipped, an interrupted one resumes; a class that fails
    does not stop the others. Under torchrun, rank r takes classes r, r + N, ... on its own device."""
    rank, world = torchrun_env()
    root = Path(opts.data.rstrip("/"))
    base = run_folder(opts, benchmark=True)
    if opts.classes:
        wanted = set(opts.classes.split(","))
        unknown = wanted - {c.name for c in classes}
        if unknown:
            raise SystemExit(f"--classes: {', '.join(sorted(unknown))} not in {root} "
                             f"(it has {', '.join(c.name for c in classes)})")
        classes = [c for c in classes if c.name in wanted]
    base.mkdir(parents=True, exist_ok=True)
    listing = base / "benchmark.json"  # every class the table must show, finished or not
    known = json.loads(listing.read_text())["classes"] if listing.is_file() else []
    if rank == 0:
        atomic_write(listing, json.dumps({"root": str(root), "classes": sorted(set(known) | {c.name for c in classes})}))
    failed = []
    for cls in classes[rank::world]:
        run = base / cls.name
        if (run / "metrics.json").is_file():
            print(f"== {cls.name}: finished before, skipped ({run / 'metrics.json'})")
            continue
        resume = (run / "ckpt.pt").is_file()
        print(f"== {cls.name}: {'resuming' if resume else 'training'} in {run}", flush=True)
        try:
            train(cfg, replace(opts, data=str(cls), out=str(run)), resume=resume)
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):  # an interrupt: stop the whole benchmark
                raise
            print(f"== {cls.name} FAILED: {e.code}", file=sys.stderr, flush=True)
            failed.append(cls.name)
    with open(base / ".table.lock", "a") as f:  # the last rank to finish writes the complete table
        fcntl.flock(f, fcntl.LOCK_EX)
        print(write_table(base))
    if failed:
        raise SystemExit(f"{len(failed)} class(es) failed: {', '.join(failed)} (messages above); the others "
                         f"finished. Fix the data and run the same command again")


def write_table(folder):
    """table.md and table.csv of a benchmark folder; returns the markdown."""
    if not Path(folder).is_dir():
        raise SystemExit(f"{folder}: no such folder (a benchmark's runs, e.g. runs/VisA_20220922)")
    md, text = table(folder)
    atomic_write(Path(folder) / "table.md", md)
    atomic_write(Path(folder) / "table.csv", text)
    return md + f"\nwrote {Path(folder) / 'table.md'} and table.csv"


def main(args):
    """python diffusionad.py table FOLDER."""
    print(write_table(args.folder))
