"""The command line of diffusionad.py: one parser, a subcommand per verb. train and bench take a flag per field of
Config and RunOptions (extras/options.py); eval, predict and export load a trained run."""
import argparse

from extras.anomalies import FILLS, FOREGROUNDS, SHAPES
from extras.options import add_flags, parse_ints, parse_size


def parser(config_cls, doc):
    p = argparse.ArgumentParser(prog="diffusionad.py", description=doc, allow_abbrev=False)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="Alg. 1: train on the normal images of --data, then evaluate", allow_abbrev=False)
    add_flags(t, config_cls)
    t.add_argument("--resume", action="store_true", help="continue the run in --out (or the default run folder) from "
                   "its checkpoint")
    e = sub.add_parser("eval", help="Alg. 2 on the test split: metrics, FPS, reliance, optional map panels",
                       allow_abbrev=False)
    run_flags(e, "the most recent under runs/")
    e.add_argument("--data", help="test data (default: the training data)")
    e.add_argument("--test", default="", help="a labelled test folder (good/ and one folder per defect type)")
    e.add_argument("--test-masks", default="", help="masks of --test (default: TEST/masks)")
    e.add_argument("--save-maps", action="store_true", help="PNG panels: input | restoration | map | truth")
    e.add_argument("--json", help="where to write the metrics (default: <run>/eval_<checkpoint>_<data>_t<t>.json)")
    r = sub.add_parser("predict", help="score your own images, decide, write heatmaps", allow_abbrev=False)
    r.add_argument("inputs", nargs="+", help="image files or folders")
    run_flags(r, "the most recent run")
    r.add_argument("--out", help="new folder for heatmap PNGs (default: <run>/predictions-<date-time>)")
    r.add_argument("--csv", help="write the rows to this new file instead of stdout")
    r.add_argument("--threshold", type=float, help="anomalous when score >= this (default: the checkpoint's)")
    x = sub.add_parser("export", help="Alg. 2 as a torch.export program, loadable with torch alone",
                       allow_abbrev=False)
    run_flags(x, "the most recent run")
    x.add_argument("--out", required=True, help="new .pt2 file; its threshold goes to the .json beside it")
    m = sub.add_parser("import-authors", help="a run folder from a checkpoint of the authors' train.py "
                       "(params-best.pt / params-last.pt), for eval, predict, export and table", allow_abbrev=False)
    m.add_argument("params", help="the authors' checkpoint (read with weights_only=True)")
    m.add_argument("--out", required=True, help="new run folder")
    m.add_argument("--data", default="", help="the class it was trained on (ROOT/CLASS): recorded for eval, and its test "
                   "split evaluated now (metrics.json, for table)")
    m.add_argument("--threshold-from", default="", help="a folder of normal images the model was not trained on: the "
                   "--threshold-quantile quantile of their scores becomes the stored decision threshold")
    m.add_argument("--threshold-quantile", type=float, default=0.99)
    m.add_argument("--eval-batch", type=int, default=8)
    m.add_argument("--device", default="auto")
    m.add_argument("--log-every", type=float, default=10.0)
    b = sub.add_parser("bench", help="training and inference speed and memory, plain and shipped paths side by side; "
                       "every train flag sets the model and data", allow_abbrev=False)
    add_flags(b, config_cls)
    b.add_argument("--n-images", type=int, default=8, help="test images for the inference timing")
    b.add_argument("--train-size", type=int, default=128, help="image size for the training-step timing")
    b.add_argument("--train-steps", type=int, default=3, help="timed training steps per path")
    s = sub.add_parser("table", help="the benchmark table of runs/<root name>: ours and the paper's", allow_abbrev=False)
    s.add_argument("folder", help="a benchmark's run folder, e.g. runs/VisA_20220922")
    data_verbs(sub)
    return p


def data_verbs(sub):
    """preview and resize (extras/data_verbs.py)."""
    v = sub.add_parser("preview", help="a grid of N | A | M | S rows: what the synthesizer makes (the paper's Fig. 4)",
                       allow_abbrev=False)
    v.add_argument("--data", required=True, help="ROOT/CLASS, a plain folder or 'synthetic'")
    v.add_argument("--out", required=True, help="output PNG")
    v.add_argument("--n", type=int, default=8, help="rows")
    v.add_argument("--img-size", type=parse_size, default=256, metavar="S|H,W")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--texture-dir", default="", help="anomaly source textures (e.g. DTD)")
    v.add_argument("--foreground", default="auto", choices=FOREGROUNDS)
    v.add_argument("--shape", default="perlin", choices=SHAPES, help="anomaly masks (--anomaly-shape)")
    v.add_argument("--fill", default="blend", choices=FILLS, help="anomaly content (--anomaly-fill)")
    r = sub.add_parser("resize", help="copy a class folder (MVTec AD, VisA 1cls or DAGM) at the size the loader would "
                       "resize it to: images bilinear, masks as the loader reads them, other files as they are",
                       allow_abbrev=False)
    r.add_argument("--data", required=True, help="ROOT/CLASS")
    r.add_argument("--out", required=True, help="new folder for the copy")
    r.add_argument("--img-size", type=parse_size, default=256, metavar="S|H,W")


def run_flags(p, default):
    """The flags of the commands that load a trained run."""
    p.add_argument("--run", help=f"run folder (default: {default})")
    p.add_argument("--ckpt", help="checkpoint file (instead of --run)")
    p.add_argument("--eval-t", type=parse_ints, help="inference time steps, e.g. 100,200 (default: the run's)")
    p.add_argument("--eval-batch", type=int, help="images per inference batch (default: the run's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, help="bf16 autocast (GPUs; CPUs with native "
                   "bf16); --no-amp: float32 (default: the run's, bf16 inference for --preset cpu where native)")
    p.add_argument("--compile", action="store_true", help="torch.compile Alg. 2 (CUDA graphs on a GPU)")
    p.add_argument("--log-every", type=float, help="seconds between progress lines")
    p.add_argument("--alg2", action="store_true", help="a run of the authors' variant (trained or imported): the "
                   "paper's Alg. 2 instead of their guided evaluation (at t = 100,200 unless --eval-t)")
