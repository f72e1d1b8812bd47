"""Every preprocessing family end to end, with the tiny models of `recipes/families/`:

* images of several sizes and aspect ratios (and two-image samples) batch together;
* the slots the processor reserves == the tokens the model produces == the family's layout
  (what `vlmkit tokens` reports), for every image;
* the model learns a visual task a blind model cannot (name the colour, 4 balanced classes);
* batched greedy generation equals one-by-one generation.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from typer.testing import CliRunner

from vlmkit.cli import app
from vlmkit.config import load_config
from vlmkit.data.formats import Message, Sample
from vlmkit.data.synthetic.families import COLOURS, colour_image
from vlmkit.data.collate import collate
from vlmkit.generate import GenerationConfig, decode, generate
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.processing import build_chat_processor
from vlmkit.train.losses import decoder_hidden, next_token_loss

torch.set_num_threads(1)

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "families"
FAMILIES = sorted(p.stem for p in RECIPES.glob("*.yaml"))
IMAGE_FAMILIES = [f for f in FAMILIES if f != "qwen2-vl-video"]
SIZES = [(40, 24), (24, 72), (96, 96), (128, 32), (17, 33)]
QUESTION = "What colour is the image? Answer with one word."


def test_every_seed_family_has_a_recipe():
    assert set(FAMILIES) >= {"fixed", "anyres", "internvl", "qwen2-vl", "qwen2-vl-video", "pixtral", "mllama", "idefics3",
                             "qformer", "perceiver", "encoder-free"}


def config(family: str):
    return load_config(RECIPES / f"{family}.yaml")


@functools.lru_cache(maxsize=None)
def built(family: str) -> VisionLanguageModel:
    torch.manual_seed(0)
    return VisionLanguageModel.build(config(family).model, pretrained=False).eval()


def image_of(colour: str, size, seed: int = 0):
    return colour_image(random.Random(seed), colour, *size)


def sample(i: int, images, question=QUESTION, answer="red") -> Sample:
    marks = "".join("<image>\n" for _ in images)
    return Sample(id=f"s{i}", messages=[Message("user", marks + question), Message("assistant", answer)], images=list(images))


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_slots_equal_model_tokens_equal_layout_in_a_mixed_batch(family):
    model = built(family)
    proc = build_chat_processor(model, 4096)
    samples = [sample(i, [image_of("red", s, i)]) for i, s in enumerate(SIZES)]
    samples.append(sample(9, [image_of("blue", (64, 32)), image_of("green", (24, 48))], "What colour is the second image?"))
    encoded = [proc.encode(s) for s in samples]
    for s, enc in zip(samples, encoded):
        layouts = [proc.image_processor.layout(*im.size).slots for im in s.images]
        made = [model.image_slots(im) for im in enc.images]
        slots = int((enc.input_ids == model.image_token_id).sum())
        assert slots == sum(made) == sum(layouts), (s.id, slots, made, layouts)
    # ... and `vlmkit tokens --recipe` reports the same count for each image size.
    for w, h in {im.size for s in samples for im in s.images}:
        out = CliRunner().invoke(app, ["tokens", "--recipe", str(RECIPES / f"{family}.yaml"), "--size", f"{w}x{h}", "--json"])
        assert out.exit_code == 0, out.output
        budget = json.loads(out.output)
        reported = budget["sequence_tokens"] if budget["fusion"] == "cross-attention" else budget["visual_tokens"]
        image = proc.image_processor.preprocess(image_of("red", (w, h)))
        assert reported == model.image_slots(image), (w, h, budget)
    batch = collate(encoded, pad_id=0)
    with torch.no_grad():
        produced = model.image_tokens(batch.images)
        hidden = decoder_hidden(model, batch)
    expected = [model.count_image_tokens(im) for im in batch.images]
    assert [t.shape[0] for t in produced] == expected
    assert hidden.shape[:2] == batch.input_ids.shape and torch.isfinite(hidden).all()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(family=st.sampled_from(IMAGE_FAMILIES), width=st.integers(8, 300), height=st.integers(8, 300))
def test_random_sizes_slots_equal_tokens(family, width, height):
    if max(width, height) / min(width, height) > 12:
        return
    model = built(family)
    proc = model.image_processor
    image = proc.preprocess(image_of("red", (width, height)))
    with torch.no_grad():
        made = model.image_tokens([image])[0].shape[0]
    assert model.count_image_tokens(image) == made
    assert model.image_slots(image) == proc.layout(width, height).slots == image.layout.slots


def _toy(family: str):
    """Eight training images, two per colour, each at its own size."""
    colours = list(COLOURS)
    return [sample(i, [image_of(colours[i % 4], SIZES[i % len(SIZES)] if i % 3 else (48, 48), i)], answer=colours[i % 4])
            for i in range(8)]


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_family_learns_what_a_blind_model_cannot(family):
    torch.manual_seed(0)
    model = VisionLanguageModel.build(config(family).model, pretrained=False)
    proc = build_chat_processor(model, 4096)
    data = _toy(family)
    encoded = [proc.encode(s) for s in data]
    batch = collate(encoded, pad_id=0)
    head = model.llm.get_output_embeddings()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss, _ = next_token_loss(decoder_hidden(model, batch), batch.labels, head)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    prompts = [proc.encode_prompt(s.messages[:1], s.images) for s in data]
    answers = decode(model, generate(model, prompts, GenerationConfig(max_new_tokens=8)))
    right = sum(a.split()[0:1] == [s.messages[1].content] for a, s in zip(answers, data))
    # Balanced colours: a model that ignores the image gets at most 2 of 8.
    assert losses[-1] < 0.25 * losses[0], losses[::10]
    assert right >= 6, (answers, [s.messages[1].content for s in data])


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_greedy_equals_one_by_one(family):
    model = built(family)
    proc = build_chat_processor(model, 4096)
    if family == "qwen2-vl-video":
        pytest.skip("video prompts: covered by test_video_family_end_to_end")
    prompts = [proc.encode_prompt([Message("user", "<image>\n" + QUESTION)], [image_of("red", s, i)])
               for i, s in enumerate(SIZES[:3])]
    prompts.append(proc.encode_prompt([Message("user", "<image> <image> which?")], [image_of("blue", (32, 64)), image_of("green", (50, 20))]))
    cfg = GenerationConfig(max_new_tokens=5)
    alone = [generate(model, [p], cfg)[0] for p in prompts]
    assert generate(model, prompts, cfg) == alone


@pytest.mark.parametrize("connector,processor,message", [
    ({"name": "qformer", "options": {"num_queries": 4, "hidden_size": 16, "layers": 1, "heads": 2, "intermediate_size": 32}},
     {"name": "anyres", "image_size": 32, "options": {"patch_size": 4, "grid_pinpoints": [[32, 64], [64, 32]]}}, "2D grid"),
    ({"name": "mlp"}, {"name": "dynamic", "image_size": 32, "options": {"patch_size": 4}}, "reserves"),
    ({"name": "mlp"}, {"name": "qwen2vl", "image_size": 32, "options": {"patch_size": 4, "min_pixels": 256}}, "pre-flattened"),
])
def test_incompatible_processor_and_connector_refused_at_build(connector, processor, message):
    from vlmkit.config import ModelConfig

    raw = config("fixed").model.model_dump()
    raw["connector"], raw["processor"] = connector, processor
    with pytest.raises(ValueError) as err:
        VisionLanguageModel.build(ModelConfig.model_validate(raw), pretrained=False)
    text = str(err.value)
    assert processor["name"] in text and connector["name"] in text and message in text, text


def test_video_family_end_to_end(tmp_path):
    """Qwen2-VL video: 4 frames in temporal patches of 2 (grid t = 2), 3D positions, learned and
    decoded in a batch exactly as one by one."""
    from vlmkit.processing.video import VideoInput, write_video

    torch.manual_seed(0)
    model = VisionLanguageModel.build(config("qwen2-vl-video").model, pretrained=False)
    proc = build_chat_processor(model, 4096)
    colours = list(COLOURS)
    data = []
    for i in range(8):
        size = [(32, 32), (48, 32), (32, 64)][i % 3]
        path = write_video(tmp_path / f"v{i}.mp4", [image_of(colours[i % 4], size, 10 * i + f) for f in range(4)], fps=4)
        data.append(Sample(id=f"v{i}", messages=[Message("user", "<video>\nWhat colour is the video?"),
                                                  Message("assistant", colours[i % 4])], videos=[str(path)]))
    encoded = [proc.encode(s) for s in data]
    for enc in encoded:
        (image,) = enc.images
        assert image.views[0].grid[0] == 2  # 4 frames -> 2 temporal patches
        assert int((enc.input_ids == model.image_token_id).sum()) == model.image_slots(image) == image.layout.slots
        assert enc.position_ids.shape == (3, len(enc.input_ids))
    batch = collate(encoded, pad_id=0)
    head = model.llm.get_output_embeddings()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    first = None
    for _ in range(60):
        opt.zero_grad()
        loss, _ = next_token_loss(decoder_hidden(model, batch), batch.labels, head)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    model.eval()
    prompts = [proc.encode_prompt(s.messages[:1], [VideoInput(s.videos[0])]) for s in data]
    cfg = GenerationConfig(max_new_tokens=8)
    batched = generate(model, prompts, cfg)
    assert batched == [generate(model, [p], cfg)[0] for p in prompts]
    answers = decode(model, batched)
    assert loss.item() < 0.25 * first
    assert sum(a.split()[0:1] == [s.messages[1].content] for a, s in zip(answers, data)) >= 6, answers


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_placeholder_segments_are_typed_and_add_up(family):
    """A placeholder expands into typed segments: slots the model fills, separator text between
    them; the slots add up to the layout's, and one-token separators to its special tokens."""
    from vlmkit.processing.base import Slots, Text, render

    proc = built(family).image_processor
    for w, h in SIZES:
        layout = proc.layout(w, h)
        segments = proc.segments(layout)
        assert all(isinstance(s, (Slots, Text)) for s in segments)
        assert sum(s.count for s in segments if isinstance(s, Slots)) == layout.slots
        assert render(segments, "<image>") == proc.placeholder_text(layout, "<image>")
        if family in ("qwen2-vl", "pixtral", "internvl"):  # each separator is one special token
            assert sum(isinstance(s, Text) for s in segments) == layout.special_tokens
