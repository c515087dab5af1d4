"""The authors' checkpoints as run folders of ours (`python diffusionad.py import-authors PARAMS.pt --out RUN`), as
timm's converters do: facts about their files, none of their code (scripts/authors_check.py compares with their
modules). Their train.py (HuiZhang0812/DiffusionAD) saves their UNetModel's and SegmentationSubNetwork's state_dicts,
their `args` (args/args1.json plus what train.py adds) and the epoch. Our denoiser has their UNetModel's names and
shapes; our seg net is DRAEM's discriminative net under other names (authors_weights). An imported run evaluates with
their guided inference (extras/authors.py; `eval --alg2`: the paper's Alg. 2); what differs from their eval.py is
listed in the README (Deviations)."""
from pathlib import Path

import torch

import diffusionad
from extras import checks, reports
from extras.checkpoints import save_checkpoint, write_config
from extras.folders import list_images, load_image
from extras.authors import NormGuided
from extras.inference import run_inference
from extras.options import RunOptions, check_flags, ints
from extras.speed import pick_device
from extras.thresholds import from_normals


def authors_config(args, seg=None):
    """The fields of Config that a checkpoint of the authors' train.py fixes, from its `args` (args/args1.json plus
    what train.py added): their UNetModel and GaussianDiffusionModel as train.py builds them (images in [0, 1] and
    x0_hat clamped to (-1, 1), as DiffusionAD.restore does), the seg net's width from its first convolution in `seg`
    (their state_dict; train.py: 64). ValueError for what we cannot run."""
    size = args.get("img_size", 256)
    size = size if isinstance(size, int) else list(size)
    if isinstance(size, list) and (len(size) != 2 or size[0] != size[1]):
        raise ValueError(f"img_size {size}: only square images are supported")
    size = size[0] if isinstance(size, list) else size
    mult = ints(args.get("channel_mults", "") or "")
    schedule, T = args.get("beta_schedule", "linear"), int(args.get("T", 1000))
    if schedule != "linear":
        raise ValueError(f"beta_schedule {schedule!r}: only the linear schedule (the paper's, args1.json's) is supported")
    if int(args.get("channels", 3)) != 3:
        raise ValueError(f"channels {args['channels']}: only RGB models (3 channels) are supported")
    head_channels = args.get("num_head_channels", -1)
    first = (seg or {}).get("encoder_segment.block1.0.weight")  # (width, 6, 3, 3)
    return dict(img_size=int(size), base_channels=int(args.get("base_channels", 128)), channel_mult=mult,
                num_res_blocks=2, attn_resolutions=(32, 16, 8),  # train.py passes neither (args1.json's
                # attention_resolutions is not read): UNetModel's defaults; num_heads falls back to UNetModel's 1
                num_heads=int(args.get("num_heads", 1)), num_head_channels=int(head_channels if head_channels != "" else -1),
                dropout=float(args.get("dropout", 0) or 0), timesteps=T,
                beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T,  # their linear schedule, scaled to T
                seg_channels=int(first.shape[0]) if first is not None else 64)


def authors_weights(unet, seg):
    """(denoiser, seg) state_dicts in our names from the authors' unet_model_state_dict and seg_model_state_dict.
    The denoiser's names are theirs; the seg net's encoder_segment.block1..6 are enc.0..5, decoder_segment's
    up_b, up1..up4 are up.0..4, db_b, db1..db4 are dec.0..4, fin_out.0 is out."""
    def seg_name(k):
        part, rest = k.split(".", 1)
        if part == "encoder_segment" and rest.startswith("block"):
            n, rest = rest[5:].split(".", 1)
            return f"enc.{int(n) - 1}.{rest}"
        if part == "decoder_segment":
            n, rest = rest.split(".", 1)
            if n == "fin_out":
                return "out." + rest.split(".", 1)[1]
            if n[:2] in ("up", "db"):
                return f"{'up' if n[:2] == 'up' else 'dec'}.{0 if n[2:] == '_b' else int(n[2:])}.{rest}"
        return k  # unknown: left as it is, so that a strict load names it
    return dict(unet), {seg_name(k): v for k, v in seg.items()}


def read_checkpoint(path):
    """What the authors' train.py saves (unet_model_state_dict, seg_model_state_dict, args, n_epoch), read with
    weights_only=True. Their `args` is a collections.defaultdict(str); it is read as a plain dict."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"import-authors: no file at {path}")
    as_dict = lambda factory=None: {}  # their defaultdict(str), rebuilt as a plain dict: weights_only allows it
    try:
        with torch.serialization.safe_globals([(as_dict, "collections.defaultdict"), str]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"{path}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         "import-authors reads the params-*.pt files of the authors' train.py")
    keys = {"unet_model_state_dict", "seg_model_state_dict", "args"}
    if not isinstance(ckpt, dict) or not keys <= ckpt.keys():
        have = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"{path}: not a checkpoint of the authors' train.py (expected {', '.join(sorted(keys))}; "
                         f"found {have})")
    if not isinstance(ckpt["args"], dict):
        raise SystemExit(f"{path}: its args are a {type(ckpt['args']).__name__}, not the dict of settings their "
                         "train.py saves; import-authors reads their params-*.pt files as train.py writes them")
    for k in ("unet_model_state_dict", "seg_model_state_dict"):
        if not isinstance(ckpt[k], dict) or not all(isinstance(v, torch.Tensor) for v in ckpt[k].values()):
            raise SystemExit(f"{path}: its {k} is a {type(ckpt[k]).__name__}, not a state dict of tensors; "
                             "import-authors reads their params-*.pt files as train.py writes them")
    return ckpt


def variant_settings(args):
    """The fields of Config and RunOptions of their released variant that a checkpoint's args fix (args1.json's
    values where a key is missing or empty)."""
    get = lambda key, default, kind: kind(args[key]) if args.get(key, "") != "" else default
    normal, noisier = get("eval_normal_t", 200, int), get("eval_noisier_t", 400, int)
    return (dict(eval_t=(normal, noisier), batch_size=get("Batch_Size", 16, int), epochs=get("EPOCHS", 3000, int),
                 lr=get("diffusion_lr", 1e-4, float)),
            dict(variant="authors", guide_t=get("less_t_range", 300, int), condition_w=get("condition_w", 1.0, float),
                 seg_lr=get("seg_lr", 1e-5, float)))


def main(args):
    """import-authors: the authors' params-*.pt as a run folder of ours, restoring exactly as their code does.
    Everything is checked before the folder is written; --data's test split is then evaluated (metrics.json)."""
    ckpt = read_checkpoint(args.params)
    try:
        fields = authors_config(ckpt["args"], ckpt["seg_model_state_dict"])
        config, options = variant_settings(ckpt["args"])
    except (ValueError, TypeError) as e:
        raise SystemExit(f"{args.params}: its args cannot be mapped to this code: {e}")
    cfg, opts = check_flags(diffusionad.Config(**fields, **config), RunOptions(
        data=args.data, out=args.out, holdout=0.0, threshold_quantile=args.threshold_quantile, device=args.device,
        eval_batch=args.eval_batch, log_every=args.log_every, workers=0, **options), diffusionad.channel_mult)
    denoiser, seg = authors_weights(ckpt["unet_model_state_dict"], ckpt["seg_model_state_dict"])
    try:
        model = diffusionad.build_model(cfg, {"denoiser": denoiser, "seg": seg}, cls=NormGuided, opts=opts)
    except ValueError as e:
        raise SystemExit(f"{args.params}: the weights do not fit the networks its args describe: {e}")
    folder = Path(args.out)
    if (folder / "ckpt.pt").exists():
        raise SystemExit(f"{folder / 'ckpt.pt'} exists: pass a new --out")
    test = checks.open_test(None, opts, cfg.img_size) if args.data else None
    try:
        normal = torch.stack([load_image(f, cfg.img_size) for f in list_images([args.threshold_from])]) \
            if args.threshold_from else None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--threshold-from: {e}")
    t_normal, t_noisier = cfg.eval_t
    print(f"importing {args.params} (epoch {ckpt.get('n_epoch')}): {cfg.img_size} px, base {cfg.base_channels}, "
          f"multipliers {','.join(map(str, diffusionad.channel_mult(cfg)))}, T = {cfg.timesteps}; evaluated as their eval.py "
          f"(guided, t = {t_normal},{t_noisier}, w = {opts.condition_w}) unless eval --alg2")
    if "best" in Path(args.params).name:
        print(f"note: {Path(args.params).name} is the epoch their train.py chose on the test split (the best image + "
              "pixel AUROC, every 50 epochs): its test numbers are optimistic; params-last.pt is not chosen")
    device = pick_device(opts)
    model = model.to(device).eval()
    threshold = None if normal is None else from_normals(run_inference(model, normal, cfg, opts, device)[1], cfg, opts)
    write_config(folder, cfg, opts)
    save_checkpoint(folder / "ckpt.pt", model, None, 0, cfg, opts, threshold=threshold,
                    imported={"from": str(args.params), "n_epoch": ckpt.get("n_epoch")})
    print(f"  wrote {folder / 'ckpt.pt'} (no optimizer state: an imported run is evaluated, not resumed)")
    if test is not None:
        res = diffusionad.evaluate(model, cfg, opts, test, device, args.data, threshold)
        res.update(threshold=threshold, train_seconds=None, steps=0, imported=str(args.params))
        reports.write_metrics(folder / "metrics.json", res, cfg, opts)
