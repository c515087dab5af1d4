"""A norm-guided one-step restoration (the authors' later idea, our reading of it), evaluated on a trained
model's test split beside Alg. 2 as trained. A diagnostic of an option we do not ship (docs/RESULTS.md).

python docs/norm_guided.py RUN/ckpt.pt [--guide 400] [--t 200]
Alg. 2 restores x0 in one step at each inference time step. Here the restoration at the small step t is
guided by the large one: x0_g = the one-step estimate from x_guide (large t: anomalies drowned, details
lost); it is re-noised to t with the same noise and restored in one step from there, so the small step
adds back detail on a normal-looking image instead of on x0 with its anomaly. The map is the seg net on
cat(x0, that restoration). Prints image AUROC, pixel AUROC and PRO for Alg. 2 as trained (the run's
--eval-t) and for the guided restoration, with the same noise.
"""
import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import diffusionad as D  # noqa: E402
import metrics  # noqa: E402
import runs  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--guide", type=int, default=400, help="the large time step")
    p.add_argument("--t", type=int, default=200, help="the small time step")
    a = p.parse_args()
    state, cfg, opts = runs.load_checkpoint(a.ckpt, D.Config)
    model = D.build_model(cfg, state).eval()
    test = runs.open_test(None, opts, cfg.img_size)
    items = [test[i] for i in range(len(test))]
    images = torch.stack([it["image"] for it in items])
    labels = np.array([it["label"] for it in items])
    masks = np.stack([it["mask"][0].numpy() for it in items])
    eps = D.inference_noise(cfg.seed, 1, cfg.img_size)  # the same noise at both steps
    maps, _, _, _ = D.run_inference(model, images, cfg, replace(opts, log_every=1e9), torch.device("cpu"))
    rows = [(f"Alg. 2 as trained (t = {cfg.eval_t})", maps)]
    guided = []
    with torch.inference_mode():
        for i in range(0, len(images), opts.eval_batch):
            x0 = D.to_model(images[i: i + opts.eval_batch], cfg)
            e = eps.expand(len(x0), -1, -1, -1)
            x0_g, _ = model.restore(x0, torch.full((len(x0),), a.guide), e)  # the norm: anomalies drowned
            x0_hat, _ = model.restore(x0_g, torch.full((len(x0),), a.t), e)  # detail back, at the small step
            guided.append(torch.sigmoid(model.segment(x0, x0_hat))[:, 0])
    rows.append((f"guided: t = {a.t} from the t = {a.guide} estimate", torch.cat(guided).numpy()))
    for name, m in rows:
        scores = model.image_score(torch.from_numpy(m)).numpy()
        r = metrics.evaluate(m, masks, labels, scores)
        print(f"{a.ckpt}  {name:44s} image AUROC {100 * r['image_auroc']:5.1f}  pixel AUROC "
              f"{100 * r['pixel_auroc']:5.1f}  PRO {100 * r['pixel_pro']:5.1f}", flush=True)


if __name__ == "__main__":
    main()
