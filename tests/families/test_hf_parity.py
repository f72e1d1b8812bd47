"""One parity harness for every family vlmkit imports from transformers.

Each `tests/families/<family>/<family>_folder.py` declares `PARITY` (`tests/_parity.py`); this
module finds them (nothing lists them), imports each tiny random folder once with
`vlmkit import-hf`, and checks input ids, logits (fp32, the case's tolerance), greedy tokens and
their decoded text against transformers' own processor, model and tokenizer, on each of the case's
image sizes, under each of `_parity.SETTINGS` (as saved; harder weights, gates, sizes, decoding)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
import transformers
from _parity import SETTINGS, ParityCase, Setting, first_stop, import_tiny, noise

from vlmkit.core.types import Message
from vlmkit.generate import GenerationConfig, decode, generate
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
_imported: dict[tuple[str, str], tuple] = {}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(folder, vlmkit model, checkpoint) of a case, imported on first use and kept for the module."""

    def get(case: ParityCase, setting: Setting):
        key = case.name, setting.name
        if key not in _imported:
            root = tmp_path_factory.mktemp(f"{case.name.replace('/', '-')}-{setting.name}")
            folder, checkpoint, model = import_tiny(root, lambda folder: setting.save(case, folder))
            _imported[key] = folder, model, checkpoint
        return _imported[key]

    yield get
    _imported.clear()


RUNS = [(c, setting, size) for c in CASES for setting in SETTINGS for size in setting.sizes or c.sizes]


@pytest.mark.parametrize(("case", "setting", "size"), RUNS,
                         ids=[f"{c.name}-{setting.name}-{w}x{h}" for c, setting, (w, h) in RUNS])
def test_import_matches_transformers(imported, case: ParityCase, setting: Setting, size):
    folder, model, _ = imported(case, setting)
    image = noise(*size, seed=sum(size))
    chat = build_chat_processor(model, 1 << 16)
    prompt = chat.encode_prompt([Message("user", case.image_text + case.question)], [image])
    ref_ids, kwargs = case.reference(folder, image, case.question, prompt, model)
    assert prompt.input_ids.tolist() == ref_ids.tolist()
    # `vlmkit chat --image` and `vlmkit eval` put the image before the question this way.
    by_default = chat.encode_prompt([Message("user", chat.with_leading_images(case.question, 1))], [image])
    assert by_default.input_ids.tolist() == ref_ids.tolist()

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
    out = first_stop(out, set(eos if isinstance(eos, list) else [eos]))
    assert out == expected
    text = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True).decode(out, skip_special_tokens=True)
    assert decode(model, [expected]) == [text.strip()]


def _prefer_image_token(model, ref, prompt, reference_kwargs) -> bool:
    """Make both heads score the image token a little above a token the model emits early (its
    row: that token's, times 1.05), so greedy decoding produces it mid-answer. False where the
    head has no row for it (Llama 3.2 Vision's `<|image|>` lies past the LM head)."""
    ours, theirs = model.llm.get_output_embeddings(), ref.get_output_embeddings()
    if model.image_token_id >= ours.weight.shape[0]:
        return False
    early = generate(model, [prompt], GenerationConfig(max_new_tokens=3))[0]
    if not early:  # the first token stops: take the stop token's place instead
        early = ref.generate(input_ids=prompt.input_ids[None], **reference_kwargs, max_new_tokens=1, do_sample=False)[0, -1:].tolist()
    with torch.no_grad():
        for head in (ours, theirs):
            head.weight[model.image_token_id] = head.weight[early[-1]] * 1.05
            if getattr(head, "bias", None) is not None:
                head.bias[model.image_token_id] = head.bias[early[-1]] + abs(head.bias[early[-1]]) * 0.05
    return True


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_generated_image_token_is_decoded_as_text(imported, case: ParityCase):
    """A model may emit its own image-placeholder token (a tiny random one does, a real one may
    under sampling): generated tokens are text, never image slots. Decoding runs on, token for
    token as transformers' generate (which embeds them as ordinary tokens)."""
    from vlmkit.checkpoint import load_checkpoint

    folder, _, checkpoint = imported(case, SETTINGS[0])
    model, _ = load_checkpoint(checkpoint)  # its own copy: the head is changed below
    image = noise(71, 45, seed=7)
    prompt = build_chat_processor(model, 1 << 16).encode_prompt([Message("user", case.image_text + case.question)], [image])
    _, kwargs = case.reference(folder, image, case.question, prompt, model)
    ref = getattr(transformers, case.model_class).from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    if not _prefer_image_token(model, ref, prompt, kwargs):
        pytest.skip("the LM head has no row for the image token: the model cannot emit it")
    ids = prompt.input_ids[None]
    ours = generate(model, [prompt], GenerationConfig(max_new_tokens=10))[0]
    assert model.image_token_id in ours  # the case under test: the model did emit it
    theirs = ref.generate(input_ids=ids, **kwargs, max_new_tokens=10, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = ref.generation_config.eos_token_id
    assert first_stop(theirs, set(eos if isinstance(eos, list) else [eos])) == ours


def test_every_importable_family_has_a_parity_case():
    """A family folder that imports from transformers declares how to check it."""
    from vlmkit.families import family_specs

    covered = {case.name.split("/")[0] for case in CASES}
    missing = [spec.name for spec in family_specs() if spec.hf and spec.name not in covered]
    assert not missing, f"families without a PARITY case in tests/families/<family>/: {missing}"
