"""The authors' checkpoints as run folders of ours (`python diffusionad.py import-authors PARAMS.pt --out RUN`).

What the authors' train.py (HuiZhang0812/DiffusionAD) saves: their UNetModel's and SegmentationSubNetwork's
state_dicts, their `args` (args/args1.json plus what train.py added) and the epoch. Our denoiser has their
UNetModel's names and shapes; our seg net is DRAEM's discriminative net under other names (authors_weights).
authors_config maps their args to Config, so that an imported model restores exactly as
their code does (docs/authors_check.py compares the outputs with their modules). Like timm's converters: the
mapping is facts about their files; none of their code is here.
"""
import json
from dataclasses import asdict
from pathlib import Path

import torch

import data
import diffusionad as D
import runs


def authors_config(args, seg=None):
    """The fields of Config that a checkpoint of the authors' train.py fixes, from its `args` (args/args1.json plus
    what train.py added): their UNetModel and GaussianDiffusionModel as train.py builds them (images in [0, 1] and
    x0_hat clamped to (-1, 1), as DiffusionAD.restore does), the seg net's width from its first convolution in `seg` (their
    state_dict; train.py: 64). ValueError for what we cannot run."""
    size = args.get("img_size", 256)
    size = size if isinstance(size, int) else list(size)
    if isinstance(size, list) and (len(size) != 2 or size[0] != size[1]):
        raise ValueError(f"img_size {size}: only square images are supported")
    size = size[0] if isinstance(size, list) else size
    mult = args.get("channel_mults", "") or ""
    mult = ",".join(str(int(m)) for m in mult) if not isinstance(mult, str) else mult
    schedule, T = args.get("beta_schedule", "linear"), int(args.get("T", 1000))
    if schedule != "linear":
        raise ValueError(f"beta_schedule {schedule!r}: only the linear schedule (the paper's, args1.json's) is supported")
    if int(args.get("channels", 3)) != 3:
        raise ValueError(f"channels {args['channels']}: only RGB models (3 channels) are supported")
    head_channels = args.get("num_head_channels", -1)
    first = (seg or {}).get("encoder_segment.block1.0.weight")  # (width, 6, 3, 3)
    return dict(img_size=int(size), base_channels=int(args.get("base_channels", 128)), channel_mult=mult,
                num_res_blocks=2, attn_resolutions="32,16,8",  # train.py passes neither: UNetModel's defaults
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
    as_dict = lambda factory=None: {}
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
    return ckpt


def import_cmd(a):
    """import-authors: the authors' params-*.pt as a run folder of ours, restoring exactly as their code does.
    Everything is checked before the folder is written; --data's test split is then evaluated (metrics.json)."""
    ckpt = read_checkpoint(a.params)
    try:
        fields = authors_config(ckpt["args"], ckpt["seg_model_state_dict"])
    except (ValueError, TypeError) as e:
        raise SystemExit(f"{a.params}: its args cannot be mapped to this code: {e}")
    cfg, opts = runs.check(D.Config(**fields), runs.RunOptions(
        data=a.data, out=a.out, holdout=0.0, threshold_quantile=a.threshold_quantile, device=a.device,
        eval_batch=a.eval_batch, log_every=a.log_every, workers=0), D.channel_mult)
    denoiser, seg = authors_weights(ckpt["unet_model_state_dict"], ckpt["seg_model_state_dict"])
    try:
        model = D.build_model(cfg, {"denoiser": denoiser, "seg": seg})
    except ValueError as e:
        raise SystemExit(f"{a.params}: the weights do not fit the networks its args describe: {e}")
    folder = Path(a.out)
    if (folder / "ckpt.pt").exists():
        raise SystemExit(f"{folder / 'ckpt.pt'} exists: pass a new --out")
    test = runs.open_test(None, opts, cfg.img_size) if a.data else None
    try:
        normal = [{"image": data.load_image(f, cfg.img_size)} for f in data.list_images([a.threshold_from])] \
            if a.threshold_from else []
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--threshold-from: {e}")
    print(f"importing {a.params} (epoch {ckpt.get('n_epoch')}): {cfg.img_size} px, base {cfg.base_channels}, "
          f"multipliers {','.join(map(str, D.channel_mult(cfg)))}, T = {cfg.timesteps}")
    device = runs.pick_device(opts)
    model = model.to(device).eval()
    threshold = runs.threshold_summary(D.run_inference(model, torch.stack([n["image"] for n in normal]), cfg, opts,
                                                       device)[1], opts.threshold_quantile, cfg) if normal else None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        runs.atomic_write(folder / "config.json", json.dumps({**asdict(cfg), **asdict(opts)}, indent=2))
    except OSError as e:
        raise SystemExit(f"{folder}: cannot write the run folder ({e.strerror}); pass a writable --out")
    runs.save_checkpoint(folder / "ckpt.pt", model, None, 0, cfg, opts, threshold=threshold,
                         imported={"from": str(a.params), "n_epoch": ckpt.get("n_epoch")})
    print(f"  wrote {folder / 'ckpt.pt'} (no optimizer state: an imported run is evaluated, not resumed)")
    if test is not None:
        res = D.evaluate(model, cfg, opts, test, device, a.data, threshold)
        res.update(threshold=threshold, train_seconds=None, steps=0, imported=str(a.params))
        runs.write_metrics(folder / "metrics.json", res, cfg, opts)
