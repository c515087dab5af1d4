"""Everything beside the paper's three files (diffusionad.py, data.py, metrics.py), one concern per module.

Plumbing (never imports diffusionad.py): options (flags, presets, checks), cli (the parser), checkpoints (run folders,
checkpoints), speed (devices, layouts, compile, checkpointing), distributed (torchrun), run (one training run),
inference (Alg. 2 batched), reports (thresholds, verdicts, metrics.json, panels, progress). Data options: anomalies
(our shapes, fills, foregrounds, crops), folders (own images, the held-out slice), checks (file checks), synthetic
(the built-in set). Built on diffusionad.py: ablations (Table 3), authors (their released version), import_authors,
predict, export, bench, benchmarks (whole benchmarks and their table), data_verbs (preview, resize).
"""
