"""Put the repository root on sys.path so that tests import its modules with plain `pytest`; shared fixtures."""
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="session")
def parts(tmp_path_factory):
    """A plain folder of 24 normal 32-px images: with --holdout 0 a run on it trains and checkpoints with no
    evaluation at all (no test split, no threshold), for the tests of the training loop and its plumbing."""
    root = tmp_path_factory.mktemp("parts")
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray((rng.random((32, 32, 3)) * 60 + 100).astype(np.uint8)).save(root / f"{i:03d}.png")
    return root
