"""The authors' DiffusionAD beside the paper's: their checkpoints as run folders of ours, and their released,
norm-guided version as a variant of diffusionad.DiffusionAD (`train --variant authors`).

Import (`python diffusionad.py import-authors PARAMS.pt --out RUN`): their train.py (HuiZhang0812/DiffusionAD) saves
their UNetModel's and SegmentationSubNetwork's state_dicts, their `args` (args/args1.json plus what train.py adds)
and the epoch. Our denoiser has their UNetModel's names and shapes; our seg net is DRAEM's discriminative net under
other names (authors_weights). authors_config maps their args to Config. Like timm's converters: facts about their
files; none of their code is here (docs/authors_check.py compares with their modules).

The variant (their models/DDPM.py, train.py, eval.py; the paper's Alg. 1 and 2 are diffusionad.py's):
- guided_restore: each image noised at a normal t in [0, 300) and at a noisier t in [300, T), two denoiser passes;
  the noisier pass's x0 estimate (clamped) is re-noised to the normal t with the normal pass's predicted noise and
  guides that noise estimate with weight w, then Eq. 5 at the normal t and the clamp.
- variant_train_loss: the segmentation net on cat(x0, guided x0_hat); L_noise = the two per-image MSEs summed,
  averaged over the normal images of the batch (0 when it has none); total = L_noise + L_mask (Eq. 7).
- train: batches of independent draws, each synthetic with probability 1/2 (data.independent_batches); Adam 1e-4
  on the denoiser, Adam 1e-5 on the segmentation net on CosineAnnealingLR(T_max=10) stepped every iteration.
- NormGuided.anomaly_maps: their eval.py, one guided restoration at (eval_normal_t, eval_noisier_t) = (200, 400);
  the map of the segmentation net, the image score the mean of its top 50 values.
Images are in [0, 1], as theirs. `eval --alg2` evaluates such a run with the paper's Alg. 2 instead.
"""
import json
import math
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
                num_res_blocks=2, attn_resolutions="32,16,8",  # train.py passes neither (args1.json's
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


# ----------------------------------------------------------------------------- their released version (norm-guided)

def guided(model, x0, t_normal, t_noisier, eps_normal, eps_noisier, w):
    """(guided x0_hat, the normal pass's noise estimate, the noisier pass's): their norm_guided_one_step_denoising."""
    x_normal, x_noisier = model.q_sample(x0, t_normal, eps_normal), model.q_sample(x0, t_noisier, eps_noisier)
    eps_hat_normal, eps_hat_noisier = model.denoiser(x_normal, t_normal), model.denoiser(x_noisier, t_noisier)
    x0_noisier = model.predict_x0(x_noisier, t_noisier, eps_hat_noisier).clamp(-1, 1)
    x_guide = model.q_sample(x0_noisier, t_normal, eps_hat_normal)  # re-noised to the normal t with its noise estimate
    eps_guided = eps_hat_normal - D.extract(model.sqrt_1mab, t_normal) * w * (x_guide - x_normal)
    return model.predict_x0(x_normal, t_normal, eps_guided).clamp(-1, 1), eps_hat_normal, eps_hat_noisier


def guided_restore(model, x0, t_normal, t_noisier, eps_normal, eps_noisier, w):
    """The authors' norm-guided one-step restoration of x0 (B,3,H,W) in [0, 1]: t_normal, t_noisier (B,),
    eps_normal, eps_noisier (B,3,H,W), weight w -> x0_hat (B,3,H,W) in (-1, 1), with their clamps. model: a
    diffusionad.DiffusionAD (runs.load_checkpoint + diffusionad.build_model)."""
    return guided(model, x0, t_normal, t_noisier, eps_normal, eps_noisier, w)[0]


def variant_train_loss(model, x0, mask, is_normal, t_normal, t_noisier, eps_normal, eps_noisier, w):
    """Their training step's losses for one batch: x0 (B,3,H,W), mask (B,1,H,W), is_normal (B,) bool, the t's and
    noises of guided_restore. Returns {noise, mask, total}: L_noise = the two per-image MSEs summed, averaged over
    the normal images (0 when there are none); L_mask of the seg net on cat(x0, guided x0_hat) (Eq. 7)."""
    x0_hat, eps_hat_normal, eps_hat_noisier = guided(model, x0, t_normal, t_noisier, eps_normal, eps_noisier, w)
    mse = lambda a, b: (a - b).square().mean((1, 2, 3))  # per image, as their calc_loss
    per_image = mse(eps_hat_normal, eps_normal) + mse(eps_hat_noisier, eps_noisier)
    normal = is_normal.to(per_image.dtype)
    loss_noise = (per_image * normal).sum() / normal.sum().clamp_min(1)  # no host sync: 0 without normal images
    loss_mask = D.mask_loss(model.segment(x0, x0_hat), mask, model.cfg.gamma)
    return {"noise": loss_noise, "mask": loss_mask, "total": loss_noise + loss_mask}


class NormGuided(D.DiffusionAD):
    """The authors' released DiffusionAD: the same networks, trained with their step (forward) and evaluated as
    their eval.py (anomaly_maps). w: their condition_w (tools.build_model sets the run's)."""
    w = 1.0

    def forward(self, x0, mask, is_normal, t_normal, t_noisier, eps_normal, eps_noisier):
        return variant_train_loss(self, x0, mask, is_normal, t_normal, t_noisier, eps_normal, eps_noisier, self.w)

    def anomaly_maps(self, x0, ts, noise):
        """One guided restoration at ts = (normal t, noisier t) with the noises noise[0], noise[1] (shared by the
        images); the segmentation net's map and its top-K score. Returns maps, scores, x0_hat (1,B,3,H,W)."""
        t_normal, t_noisier = (torch.full((x0.shape[0],), t, device=x0.device) for t in ts)
        x0_hat = guided_restore(self, x0, t_normal, t_noisier, noise[0].expand_as(x0), noise[1].expand_as(x0), self.w)
        maps = torch.sigmoid(self.segment(x0, x0_hat).float())[:, 0]
        return maps, self.image_score(maps), x0_hat[None]


def seg_lr_at(step, opts):
    """The segmentation net's rate at 0-based `step`: their CosineAnnealingLR(T_max, eta_min=0) stepped after every
    iteration, never restarted: a cosine wave of period 2 T_max steps."""
    return opts.seg_lr * (1 + math.cos(math.pi * step / opts.seg_lr_period)) / 2


def train(cfg, opts, resume=False):
    """Their train.py's training on our plumbing (runs.Run: folders, resume, torchrun, checkpoints...), then the
    final evaluation with their guided inference."""
    with runs.Run(cfg, opts, resume, D.Config) as run:
        torch.manual_seed(cfg.seed)  # weights
        model = run.place(runs.one_line(build_model, cfg, opts, run.state))
        groups = [{"params": model.denoiser.parameters()}, {"params": model.seg.parameters()}]
        opt = torch.optim.Adam(groups, lr=cfg.lr, fused=run.device.type == "cuda")  # = their two Adams
        step, losses = run.start(model, opt)
        model.train()
        for batch in run.batches(step):  # independent draws, each made synthetic with probability 1/2
            x0, mask, _, g = run.inputs(batch, step)
            is_normal, B = (batch["label"] == 0).to(x0.device), len(x0)
            t_normal = torch.randint(0, opts.guide_t, (B,), generator=g).to(x0.device)
            t_noisier = torch.randint(opts.guide_t, cfg.timesteps, (B,), generator=g).to(x0.device)
            eps_normal, eps_noisier = (torch.randn(x0.shape, generator=g).to(x0.device) for _ in range(2))
            with runs.autocast(opts, run.device):
                loss = losses(x0, mask, is_normal, t_normal, t_noisier, eps_normal, eps_noisier)
            opt.zero_grad(set_to_none=True)
            loss["total"].backward()
            lr = runs.lr_at(step, cfg.lr, opts.lr_schedule, run.total)  # theirs: constant
            opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr, seg_lr_at(step, opts)
            opt.step()
            step += 1
            if run.after_step(step, loss, lr):
                break
        run.end()
        D.final_evaluation(run, model, cfg, opts)  # with their guided inference (NormGuided.anomaly_maps)
    return run.folder


def build_model(cfg, opts, state=None, device="cpu"):
    """A run's model of the variant: NormGuided with the run's guidance weight."""
    model = D.build_model(cfg, state, device, NormGuided)
    model.w = opts.condition_w
    return model


# ----------------------------------------------------------------------------- import

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
    return (dict(eval_t=f"{normal},{noisier}", batch_size=get("Batch_Size", 16, int), epochs=get("EPOCHS", 3000, int),
                 lr=get("diffusion_lr", 1e-4, float)),
            dict(variant="authors", guide_t=get("less_t_range", 300, int), condition_w=get("condition_w", 1.0, float),
                 seg_lr=get("seg_lr", 1e-5, float)))


def import_cmd(a):
    """import-authors: the authors' params-*.pt as a run folder of ours, restoring exactly as their code does.
    Everything is checked before the folder is written; --data's test split is then evaluated (metrics.json)."""
    ckpt = read_checkpoint(a.params)
    try:
        fields = authors_config(ckpt["args"], ckpt["seg_model_state_dict"])
        config, options = variant_settings(ckpt["args"])
    except (ValueError, TypeError) as e:
        raise SystemExit(f"{a.params}: its args cannot be mapped to this code: {e}")
    cfg, opts = runs.check(D.Config(**fields, **config), runs.RunOptions(
        data=a.data, out=a.out, holdout=0.0, threshold_quantile=a.threshold_quantile, device=a.device,
        eval_batch=a.eval_batch, log_every=a.log_every, workers=0, **options), D.channel_mult)
    denoiser, seg = authors_weights(ckpt["unet_model_state_dict"], ckpt["seg_model_state_dict"])
    try:
        model = build_model(cfg, opts, {"denoiser": denoiser, "seg": seg})
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
          f"multipliers {','.join(map(str, D.channel_mult(cfg)))}, T = {cfg.timesteps}; evaluated as their eval.py "
          f"(guided, t = {cfg.eval_t}, w = {opts.condition_w}) unless eval --alg2")
    if "best" in Path(a.params).name:
        print(f"note: {Path(a.params).name} is the epoch their train.py chose on the test split (the best image + "
              "pixel AUROC, every 50 epochs): its test numbers are optimistic; params-last.pt is not chosen")
    device = runs.pick_device(opts)
    model = model.to(device).eval()
    threshold = runs.threshold_summary(D.run_inference(model, torch.stack([n["image"] for n in normal]), cfg, opts,
                                                       device)[1], opts.threshold_quantile, cfg, opts) if normal else None
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
