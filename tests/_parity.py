"""What a family declares to the one Hugging Face parity harness (tests/families/test_hf_parity.py).

Each family folder's `<family>_folder.py` builds a tiny random transformers folder and declares
`PARITY`: one `ParityCase` (or a tuple of them, for families with several model types). The
harness imports the folder with `vlmkit import-hf`, and for each image size checks, against
transformers' own processor and model:
  * the prompt's input ids;
  * what the case's `reference` checks itself (pixels, patches, grids: it may assert);
  * the logits, within `atol` (fp32);
  * the greedy continuation, up to the first stop token.

Every case runs under each `Setting` of `SETTINGS`: the folder as its builder saved it, and a
harder one (weights drawn at std 0.2 instead of transformers' 0.02, so answers depend on the image;
tanh gates such as Llama 3.2 Vision's cross-attention gates opened to 0.5; odd small images; a
tokenizer without a decoder, which joins tokens with spaces as a word-level one does) where a
greedy answer is fragile enough to show a mismatch the defaults hide. The answer's text is
compared too: vlmkit's decode against the folder's own tokenizer's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmkit.checkpoint import load_checkpoint
from vlmkit.hf.registry import import_hf


@dataclass(frozen=True)
class ParityCase:
    """`save(folder)` writes the tiny transformers folder. `reference(folder, image, question,
    prompt, model)` returns transformers' input ids for the prompt (1-D) and the keyword inputs
    (besides `input_ids`) that feed transformers' model the same images; it may hand transformers
    vlmkit's pixels once it has checked them against transformers' processor (a resize that
    differs by a grey level would otherwise dominate the logits). `name` is the family folder's
    name, or `<family>/<variant>` where a family declares several cases."""

    name: str
    save: Callable[[Path], Path]
    model_class: str
    reference: Callable[[Path, Image.Image, str, Any, Any], tuple[torch.Tensor, dict]]
    sizes: tuple[tuple[int, int], ...]
    question: str = "What is shown?"
    # How vlmkit's chat and eval put the image before the question.
    image_text: str = "<image>\n"
    atol: float = 1e-4
    greedy_tokens: int = 8


@dataclass(frozen=True)
class Setting:
    """A configuration the harness applies to every case's saved folder. `init_std` redraws every
    weight matrix (not norms or biases) from N(0, init_std), what a config's `initializer_range`
    does; `gate` sets the scalar tanh gates (Llama 3.2 Vision's cross-attention and tile gates);
    `sizes` replaces the case's own image sizes; `spaced_decode` drops tokenizer.json's decoder, so
    decoding joins tokens with spaces, as a word-level tokenizer's does."""

    name: str
    init_std: float | None = None
    gate: float | None = None
    sizes: tuple[tuple[int, int], ...] | None = None
    spaced_decode: bool = False

    def save(self, case: ParityCase, folder: Path) -> Path:
        folder = case.save(folder)
        if self.spaced_decode:
            spec = json.loads((folder / "tokenizer.json").read_text())
            (folder / "tokenizer.json").write_text(json.dumps({**spec, "decoder": None}))
        if self.init_std is None and self.gate is None:
            return folder
        import transformers

        model = getattr(transformers, case.model_class).from_pretrained(folder, local_files_only=True, dtype=torch.float32)
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if self.gate is not None and p.numel() == 1 and "gate" in name:
                    p.fill_(self.gate)
                elif self.init_std is not None and p.dim() >= 2:
                    p.normal_(0.0, self.init_std)
        model.save_pretrained(folder, safe_serialization=True)
        return folder


SETTINGS = (Setting("default"),
            Setting("harder", init_std=0.2, gate=0.5, sizes=((71, 45), (13, 29)), spaced_decode=True))


def import_tiny(root: Path, save: Callable[..., Path], **options) -> tuple[Path, Path, Any]:
    """A tiny transformers folder saved by `save(root / "hf", **options)`, imported with
    `vlmkit import-hf` into `root / "vlmkit"` and loaded: (folder, checkpoint, model)."""
    folder = save(root / "hf", **options)
    checkpoint = import_hf(folder, root / "vlmkit")
    model, _ = load_checkpoint(checkpoint)
    return folder, checkpoint, model


def noise(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random image: bilinear-upscaled noise, so resampling differences stay small."""
    g = torch.Generator().manual_seed(seed)
    small = (torch.rand(max(1, height // 4), max(1, width // 4), 3, generator=g) * 255).byte().numpy()
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def first_stop(tokens: list[int], stops: set[int]) -> list[int]:
    return tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]


def check_against_transformers(model, ref, prompt, ids: torch.Tensor, kwargs: dict, tokens: int = 8,
                               positions: bool = False) -> list[int]:
    """vlmkit's logits for the encoded `prompt` equal transformers' `ref` fed `ids` (1-D) and
    `kwargs` (fp32, atol 1e-4), and so do the greedy tokens up to the first stop; returns vlmkit's
    tokens. `positions`: vlmkit's model is handed the prompt's own (M-RoPE) positions."""
    from vlmkit.generate import GenerationConfig, generate
    from vlmkit.processing.base import VisualBatch

    extra = {"position_ids": prompt.position_ids[:, None]} if positions else {}
    with torch.no_grad():
        ours = model(ids[None], VisualBatch(prompt.images), **extra).logits
        theirs = ref(input_ids=ids[None], **kwargs).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    expected = generate(model, [prompt], GenerationConfig(max_new_tokens=tokens))[0]
    out = ref.generate(input_ids=ids[None], **kwargs, max_new_tokens=tokens, do_sample=False)[0, ids.shape[0]:].tolist()
    eos = ref.generation_config.eos_token_id
    assert first_stop(out, set(eos if isinstance(eos, list) else [eos])) == expected
    return expected


def check_generated_video_token(model, ref, video, inputs_of: Callable[[Any], dict]) -> None:
    """Generated tokens are never video slots: with both heads preferring the video token, vlmkit
    keeps decoding as transformers' generate does (embedding it as an ordinary token).
    `inputs_of(prompt)` gives transformers' keyword inputs for a prompt."""
    from vlmkit.data.formats import Message
    from vlmkit.generate import GenerationConfig, generate
    from vlmkit.processing import build_chat_processor
    from vlmkit.processing.video import VideoInput

    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<video>\nWhat?")], [VideoInput(video)])
    early = generate(model, [prompt], GenerationConfig(max_new_tokens=3))[0][-1]
    heads = (model.llm.get_output_embeddings(), ref.get_output_embeddings())
    kept = heads[0].weight[model.video_token_id].clone()
    try:
        with torch.no_grad():
            for head in heads:
                head.weight[model.video_token_id] = head.weight[early] * 1.05
        expected = check_against_transformers(model, ref, prompt, prompt.input_ids, inputs_of(prompt))
        assert model.video_token_id in expected
    finally:
        with torch.no_grad():
            heads[0].weight[model.video_token_id] = kept


def check_generated_image_token(model, ref, image: Image.Image, inputs_of: Callable[[Any, torch.Tensor], dict]) -> None:
    """A model that emits its image slot token while decoding: the token is text, as in
    transformers' generate. Both models get the same head, with a bias that makes the image token
    the argmax whatever the state. `inputs_of(prompt, ids)` gives transformers' keyword inputs."""
    from vlmkit.data.formats import Message
    from vlmkit.generate import GenerationConfig, generate
    from vlmkit.processing import build_chat_processor

    head = torch.nn.Linear(ref.lm_head.in_features, ref.lm_head.out_features)
    with torch.no_grad():
        head.weight.copy_(ref.lm_head.weight)
        head.bias.zero_()[model.image_token_id] = 1e4
    model.llm.lm_head = ref.lm_head = head
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>What?")], [image])
    ours = generate(model, [prompt], GenerationConfig(max_new_tokens=4))[0]
    assert ours == [model.image_token_id] * 4
    ids = prompt.input_ids[None]
    assert ref.generate(input_ids=ids, **inputs_of(prompt, ids), max_new_tokens=4, do_sample=False)[0, ids.shape[1]:].tolist() == ours
