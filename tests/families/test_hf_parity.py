"""One parity harness for every family vlmkit imports from transformers.

Each `tests/families/<family>/<family>_folder.py` declares `PARITY` (`tests/_parity.py`); this
module finds them (nothing lists them), imports each tiny random folder once with
`vlmkit import-hf`, and checks input ids, logits (fp32, the case's tolerance) and greedy tokens
against transformers' own processor and model, on each of the case's image sizes."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
import transformers
from _parity import ParityCase, first_stop, import_tiny, noise

from vlmkit.core.types import Message
from vlmkit.generate import GenerationConfig, generate
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

HERE = Path(__file__).resolve().parent


def _declared_cases() -> list[ParityCase]:
    cases = []
    for path in sorted(HERE.glob("*/*_folder.py")):
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        declared = getattr(importlib.import_module(path.stem), "PARITY", ())
        cases.extend(declared if isinstance(declared, tuple) else (declared,))
    return cases


CASES = _declared_cases()
_imported: dict[str, tuple] = {}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(folder, vlmkit model) of a case, imported on first use and kept for the module."""

    def get(case: ParityCase):
        if case.name not in _imported:
            folder, _, model = import_tiny(tmp_path_factory.mktemp(case.name.replace("/", "-")), case.save)
            _imported[case.name] = folder, model
        return _imported[case.name]

    yield get
    _imported.clear()


@pytest.mark.parametrize(("case", "size"), [(c, s) for c in CASES for s in c.sizes],
                         ids=[f"{c.name}-{w}x{h}" for c in CASES for w, h in c.sizes])
def test_import_matches_transformers(imported, case: ParityCase, size):
    folder, model = imported(case)
    image = noise(*size, seed=sum(size))
    prompt = build_chat_processor(model, 1 << 16).encode_prompt([Message("user", case.image_text + case.question)], [image])
    ref_ids, kwargs = case.reference(folder, image, case.question, prompt, model)
    assert prompt.input_ids.tolist() == ref_ids.tolist()

    ref = getattr(transformers, case.model_class).from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    ids = prompt.input_ids[None]
    extra = {"position_ids": prompt.position_ids[:, None]} if prompt.position_ids is not None else {}
    with torch.no_grad():
        ours = model(ids, VisualBatch(prompt.images), **extra).logits
        theirs = ref(input_ids=ids, **kwargs).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=case.atol, rtol=0)

    expected = generate(model, [prompt], GenerationConfig(max_new_tokens=case.greedy_tokens))[0]
    out = ref.generate(input_ids=ids, **kwargs, max_new_tokens=case.greedy_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = ref.generation_config.eos_token_id
    assert first_stop(out, set(eos if isinstance(eos, list) else [eos])) == expected


def test_every_importable_family_has_a_parity_case():
    """A family folder that imports from transformers declares how to check it."""
    from vlmkit.families import family_specs

    covered = {case.name.split("/")[0] for case in CASES}
    missing = [spec.name for spec in family_specs() if spec.hf and spec.name not in covered]
    assert not missing, f"families without a PARITY case in tests/families/<family>/: {missing}"
