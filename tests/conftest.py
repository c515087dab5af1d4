"""Put the repository root on sys.path so that tests import its modules with plain `pytest`."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
