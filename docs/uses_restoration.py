"""Does a trained full model's segmentation net read the restoration? A diagnostic, not a way to pick models.

python docs/uses_restoration.py RUN/ckpt.pt [DATA]   (DATA: the dataset folder, if not the one the run recorded)
Evaluates the model on its test split three times, with the same noise: as trained; with x0_hat replaced
by x0 itself (a "restoration" that keeps every defect); and with x0_hat replaced by each image's mean
grey (no information). If the three agree, the segmentation net judges x0 by its look and ignores x0_hat;
if the last two fall, the restoration carries the decision. Prints image AUROC, pixel AUROC and PRO.
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import diffusionad as D  # noqa: E402
import metrics  # noqa: E402


def main(path, data_path=None):
    state, cfg = D.load_checkpoint(path)
    model = D.build_model(cfg, state).eval()
    trained = model.restore
    replace = {"as trained": lambda x0, x0_hat: x0_hat,
               "x0_hat := x0": lambda x0, x0_hat: x0.clone(),
               "x0_hat := mean grey": lambda x0, x0_hat: x0.mean((1, 2, 3), keepdim=True).expand_as(x0).clone()}
    test = data.open_dataset(data_path or cfg.data, "test", cfg.img_size)
    items = [test[i] for i in range(len(test))]
    images = torch.stack([it["image"] for it in items])
    labels = np.array([it["label"] for it in items])
    masks = [it["mask"][0].numpy() for it in items]
    ts = D.ints(cfg.eval_t)
    for name, fn in replace.items():
        model.restore = lambda x0, t, eps, fn=fn: (fn(x0, trained(x0, t, eps)[0]), None)
        maps, scores, _, _ = D.run_inference(model, images, cfg, ts, torch.device("cpu"), cfg.seed)
        m = metrics.evaluate(list(maps), masks, labels, scores)  # one pass over the pixels
        print(f"{path}  {name:20s} image AUROC {100 * m['image_auroc']:5.1f}  "
              f"pixel AUROC {100 * m['pixel_auroc']:5.1f}  PRO {100 * m['pixel_pro']:5.1f}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
