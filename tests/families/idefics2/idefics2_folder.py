"""A tiny random Idefics2 folder saved with `save_pretrained` (model, `Idefics2Processor` over the
PIL image processor, an offline tokenizer with Idefics2's special tokens, Idefics2's chat
template), the way a downloaded one looks, and its parity case: the same input ids and
visual-token counts as `Idefics2Processor` over `Idefics2ImageProcessorPil` (boundary tokens
shared between adjacent images, the space after an image followed by text), pixels within
docs/preprocessing.md's tolerance, logits and greedy tokens fed transformers' own padded pixels
and masks; the prompt starting with the image (the harness) and with text (the reference hook,
end to end).

Idefics2's template writes "User:" before a turn whose first part is an image and "User: "
otherwise."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from _hf_folders import _sharpen
from _parity import ParityCase, first_stop

from vlmkit.core.types import Message
from vlmkit.families.idefics2.hf import idefics2_inputs
from vlmkit.generate import GenerationConfig, generate
from vlmkit.hf.registry import family_of
from vlmkit.processing import build_chat_processor
from vlmkit.tokenizer import byte_level_tokenizer
from vlmkit.processing.base import VisualBatch

# docs/preprocessing.md: resized pixels within 3 of 255 intensity levels of the reference.
PIXEL_TOLERANCE = 3 / 255

# HuggingFaceM4/idefics2-8b's template: content lists only, "User:" before a leading image part.
IDEFICS2_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def save_idefics2(folder: Path, *, seed: int = 0, shortest: int = 32, longest: int = 64, patch: int = 4, latents: int = 8,
                  split: bool = False) -> Path:
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    torch.manual_seed(seed)
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]},
                           replace_extra_special_tokens=False)
    text = {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": len(tok), "rms_norm_eps": 1e-5,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": longest,
              "patch_size": patch}
    perceiver = {"hidden_size": 64, "resampler_n_latents": latents, "resampler_depth": 2, "resampler_n_heads": 4,
                 "resampler_head_dim": 16, "num_key_value_heads": 2, "rms_norm_eps": 1e-5}
    config = Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=text,
                            image_token_id=tok.convert_tokens_to_ids("<image>"))
    model = Idefics2ForConditionalGeneration(config).eval()
    _sharpen(model)
    with torch.no_grad():
        model.model.connector.perceiver_resampler.latents.normal_()
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    image_processor = Idefics2ImageProcessorPil(size={"shortest_edge": shortest, "longest_edge": longest}, do_image_splitting=split,
                                                image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35])
    Idefics2Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=latents,
                      chat_template=IDEFICS2_TEMPLATE).save_pretrained(folder)
    return folder


def idefics2_processor(folder: Path):
    from transformers import AutoTokenizer, Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    return Idefics2Processor.from_pretrained(folder, local_files_only=True,
                                             image_processor=Idefics2ImageProcessorPil.from_pretrained(folder, local_files_only=True),
                                             tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))


def reference_inputs(folder: Path, images, leading: bool):
    """`Idefics2Processor`'s inputs for one user turn: "What is shown?" (unless `leading`), the
    images, then "Answer."."""
    hf_proc = idefics2_processor(folder)
    before = [] if leading else [{"type": "text", "text": "What is shown?"}]
    content = before + [{"type": "image"} for _ in images] + [{"type": "text", "text": "Answer."}]
    text = hf_proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return hf_proc(images=[images], text=text, return_tensors="pt")


def check_ids_and_pixels(model, prompt, hf_inputs) -> None:
    """vlmkit's prompt against `Idefics2Processor`'s: ids, image-token count, and each view's
    pixels (transformers' view cut to the whole patches the model reads)."""
    assert prompt.input_ids.tolist() == hf_inputs["input_ids"][0].tolist()
    assert sum(model.count_image_tokens(im) for im in prompt.images) == int((hf_inputs["input_ids"] == model.image_token_id).sum())
    ours_inputs = idefics2_inputs(prompt.images)
    std = torch.tensor(model.config.processor.std)[:, None, None]
    views = [v for im in prompt.images for v in im.views]
    assert len(views) == hf_inputs["pixel_values"].shape[1]
    for i, v in enumerate(views):
        theirs = hf_inputs["pixel_values"][0, i, :, : v.size[0], : v.size[1]]
        assert ((ours_inputs["pixel_values"][0, i, :, : v.size[0], : v.size[1]] - theirs).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6


def check_against_transformers(folder, model, ref, images, greedy: bool = True, leading: bool = False) -> None:
    """Ids, pixels, logits (fed transformers' own pixels, padding and masks) and greedy tokens."""
    hf_inputs = reference_inputs(folder, images, leading)
    ours = ("" if leading else "What is shown?") + "<image>" * len(images) + "Answer."
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", ours)], images)
    check_ids_and_pixels(model, prompt, hf_inputs)
    with torch.no_grad():
        ours = model(prompt.input_ids[None], visuals=VisualBatch(prompt.images)).logits
        theirs = ref(**hf_inputs).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    if greedy:
        expected = generate(model, [prompt], GenerationConfig(max_new_tokens=8))[0]
        out = ref.generate(**hf_inputs, max_new_tokens=8, do_sample=False)[0, prompt.input_ids.shape[0]:].tolist()
        eos = ref.generation_config.eos_token_id
        assert first_stop(out, set(eos if isinstance(eos, list) else [eos])) == expected


@functools.lru_cache(maxsize=2)
def _transformers_model(folder: Path):
    from transformers import Idefics2ForConditionalGeneration

    return Idefics2ForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()


def _parity_reference(folder, image, question, prompt, model):
    assert family_of(model) == "idefics2"
    # The question before the image ("User: " then text), end to end.
    check_against_transformers(folder, model, _transformers_model(folder), [image], leading=False)
    # The harness's prompt starts with the image: transformers gets its own pixels and masks.
    hf_inputs = reference_inputs(folder, [image], leading=True)
    check_ids_and_pixels(model, prompt, hf_inputs)
    return hf_inputs["input_ids"][0], {k: v for k, v in hf_inputs.items() if k != "input_ids"}


# (20, 20): raised to the shortest edge; (72, 40), (24, 90): longest edge cut, sides not whole
# patches; (100, 100): down to the longest edge; (50, 45): kept as is.
PARITY = ParityCase("idefics2", save_idefics2, "Idefics2ForConditionalGeneration", _parity_reference,
                    sizes=((20, 20), (72, 40), (24, 90), (100, 100), (50, 45)), question="Answer.", image_text="<image>")
