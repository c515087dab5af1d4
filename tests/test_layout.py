"""The card's shape: three small files at the top, everything else in extras/, imports one way, the model section
and the synthesizer copy out alone, no file, class or function past its size."""
import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import diffusionad as D

ROOT = Path(__file__).resolve().parents[1]
PLUMBING = ("options", "cli", "checkpoints", "speed", "distributed", "run", "inference", "reports", "anomalies",
            "folders", "checks", "synthetic")  # never import diffusionad.py
ON_TOP = ("ablations", "authors", "import_authors", "predict", "export", "bench", "benchmarks", "data_verbs")


def module_imports(path):
    """The modules a file imports at module level (not inside functions)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if node.module == "extras"}
    return names


def test_the_top_level_is_the_cards_and_nothing_is_too_long():
    assert sorted(p.name for p in ROOT.glob("*.py")) == ["data.py", "diffusionad.py", "metrics.py"]
    limits = {"diffusionad.py": 500, "data.py": 500, "metrics.py": 300}
    for name, limit in limits.items():
        assert len((ROOT / name).read_text().splitlines()) <= limit, name
    assert not list((ROOT / "docs").glob("*.py")) and not list((ROOT / "docs").glob("*.sh"))  # text and pictures
    for path in [*ROOT.glob("*.py"), *(ROOT / "extras").glob("*.py"), *(ROOT / "scripts").glob("*.py")]:
        text = path.read_text()
        assert len(text.splitlines()) <= max(limits.get(path.name, 0), 400), path
        for node in ast.walk(ast.parse(text)):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef):
                assert size <= 120, f"{path.name}: class {node.name} has {size} lines"
            elif isinstance(node, ast.FunctionDef):
                assert size <= 60, f"{path.name}: {node.name} has {size} lines"


def test_imports_go_one_way():
    graph = {p.stem: module_imports(p) for p in ROOT.glob("*.py")}
    graph.update({f"extras.{p.stem}": module_imports(p) for p in (ROOT / "extras").glob("*.py")})
    for name in ("data", "metrics"):
        assert not {m for m in graph[name] if m.startswith("extras") or m == "diffusionad"}, name
    for name in PLUMBING:
        assert "diffusionad" not in graph[f"extras.{name}"], name
    for name in ON_TOP:  # built on diffusionad.py: it reaches them through ELSEWHERE only
        assert f"extras.{name}" not in graph["diffusionad"], name
    for start in graph:  # no circle at module level
        seen, todo = set(), [m for m in graph[start] if m in graph]
        while todo:
            m = todo.pop()
            assert m != start, f"an import circle through {start}"
            if m not in seen:
                seen.add(m)
                todo += [n for n in graph[m] if n in graph]
    assert set(D.ELSEWHERE.values()) >= {f"extras.{m}:main" for m in ("predict", "export", "bench", "benchmarks")}


def test_python_diffusionad_py_loads_each_module_once(tmp_path):
    r = subprocess.run([sys.executable, "-X", "importtime", "diffusionad.py", "table", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    imported = [line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")]
    assert "extras.benchmarks" in imported and "extras.run" in imported, r.stderr[-2000:]
    assert "diffusionad" not in imported and "extras.ablations" not in imported  # only what the verb needs


def test_the_model_section_copies_out_alone():
    source = (ROOT / "diffusionad.py").read_text()
    model = source[source.index("@dataclass\nclass Config"): source.index("\n\n# ------", source.index("def build_model("))]
    script = ("import math\nfrom dataclasses import dataclass\nimport torch\nimport torch.nn as nn\n"
              "import torch.nn.functional as F\n" + model + "\n"
              "cfg = Config(img_size=32, base_channels=16, channel_mult=(1, 2), seg_channels=4)\n"
              "m = build_model(cfg).eval()\n"
              "out = m.anomaly_maps(torch.rand(2, 3, 32, 32), (100, 200), torch.randn(2, 3, 32, 32))\n")
    alone = {"__name__": "copied"}  # a namespace holding only what the section defines and imports: torch alone
    exec(compile(script, "copied.py", "exec"), alone)
    assert alone["out"][0].shape == (2, 32, 32) and alone["out"][1].shape == (2,)
    assert not {"data", "metrics", "extras", "np", "sys"} & set(alone)
    with pytest.raises(ValueError, match="no default --channel-mult for --img-size 96"):  # the model raises, the
        D.DiffusionAD(D.Config(img_size=96))                                             # CLI turns it into one line
    with pytest.raises(SystemExit, match="no default --channel-mult for --img-size 96"):
        D.main(["train", "--img-size", "96"])


def test_the_synthesizer_copies_out_alone_and_is_found_first():
    source = (ROOT / "data.py").read_text()
    start = source.index("# ===")
    assert "the anomaly synthesizer (Sec. 3.3)" in source[start: source.index("\n", start)]
    section = source[start: source.index("# ===", start + 5)]
    assert "# Eq. (9)" in section and "Sec. 3.3" in source[:start]
    alone = {"__name__": "copied"}
    exec(compile("import math\nimport numpy as np\n" + section, "synth.py", "exec"), alone)  # numpy alone
    N = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    S, M = alone["synthesize"](N, None, np.random.default_rng(1))
    assert M.any() and np.array_equal(S[M == 0], N[M == 0])
    ours = __import__("data").synthesize(N, None, np.random.default_rng(1))
    assert np.array_equal(S, ours[0]) and torch.is_tensor(torch.from_numpy(S))
