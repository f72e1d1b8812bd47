"""Tests are grouped by subject (processing/, model/, hf/, train/, eval/, serve/, cli/, hostile/,
and families/<family>/ for each model family); the builders they share (`_tiny.py`,
`_hf_folders*.py`, `_parity.py`, `_serve_util.py`, the child scripts) and `data/` stay here,
importable from every group, as is each family folder's tiny Hugging Face folder builder."""

import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent
# Some groups reuse another's builders (the scale tests' recipe and data, the HF parity helpers).
sys.path[:0] = [str(TESTS)] + sorted({str(t.parent) for t in [*TESTS.glob("*/test_*.py"), *TESTS.glob("families/*/test_*.py")]})

# Tests are timed on small machines; intra-op threads only add contention there.
torch.set_num_threads(1)
