"""A tiny random SmolVLM2 folder, saved the way a downloaded one looks: `save_pretrained` weights,
`SmolVLMImageProcessorPil`'s preprocessor_config.json, an offline tokenizer with SmolVLM's special
tokens, SmolVLM2's chat template and processor_config.json. (`SmolVLMProcessor` cannot be built
here: its video processor needs torchvision, and it needs num2words; its image prompt layout is
reproduced with transformers' own `get_image_prompt_string`.) Its parity case: the same input ids
and visual-token counts as SmolVLM's processor layout over `SmolVLMImageProcessorPil`, pixels
within docs/preprocessing.md's tolerance, then logits and greedy tokens."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _hf_folders import _sharpen
from _parity import ParityCase

from vlmkit.hf.registry import family_of
from vlmkit.tokenizer import byte_level_tokenizer

# docs/preprocessing.md: resized pixels within 3 of 255 intensity levels of the reference.
PIXEL_TOLERANCE = 3 / 255


def smolvlm_template() -> str:
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    return DEFAULT_CHAT_TEMPLATE


def save_smolvlm(folder: Path, *, seed: int = 0, crop: int = 32, patch: int = 4, longest_edge: int = 96, video_fps: float = 2,
                 max_frames: int = 6, video_edge: int = 48) -> Path:
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    torch.manual_seed(seed)
    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<fake_token_around_image>", "<global-img>",
                                                          "<end_of_utterance>", "<video>"]}, replace_extra_special_tokens=False)
    text = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "vocab_size": len(tok),
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": crop,
              "patch_size": patch}
    config = SmolVLMConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    model = SmolVLMForConditionalGeneration(config).eval()
    _sharpen(model)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(smolvlm_template())
    SmolVLMImageProcessorPil(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": crop},
                             image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.3, 0.35]).save_pretrained(folder)
    # SmolVLM2 folders keep the video sampling in the image processor's settings.
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    settings["video_sampling"] = {"fps": video_fps, "max_frames": max_frames, "video_size": {"longest_edge": video_edge}}
    (folder / "preprocessor_config.json").write_text(json.dumps(settings, indent=2))
    (folder / "processor_config.json").write_text(json.dumps(
        {"processor_class": "SmolVLMProcessor", "image_seq_len": (crop // patch) ** 2 // 4}))
    return folder


def smolvlm_reference_inputs(folder: Path, images, content: list[dict]):
    """What SmolVLMProcessor gives for one user turn (`content`: image / text parts): the chat
    template rendered, each <image> expanded by transformers' `get_image_prompt_string` with the
    PIL image processor's rows / cols, and that processor's pixel values."""
    from transformers import AutoTokenizer
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    proc = SmolVLMImageProcessorPil.from_pretrained(folder, local_files_only=True)
    out = proc(images=[list(images)], return_row_col_info=True, return_tensors="pt")
    seq = json.loads((Path(folder) / "processor_config.json").read_text())["image_seq_len"]
    rendered = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    parts = rendered.split("<image>")
    expanded = parts[0] + "".join(
        get_image_prompt_string(r, c, seq, "<fake_token_around_image>", "<image>", "<global-img>") + rest
        for r, c, rest in zip(out["rows"][0], out["cols"][0], parts[1:]))
    ids = tok(expanded, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids, out["pixel_values"]


# num2words' words for the frame counts the tests use (num2words is not installed here).
_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}


def smolvlm_video_reference(folder: Path, video: Path, text: str):
    """What SmolVLM2's processor gives for one user turn `text` + a video. Its video processor
    needs torchvision, so: transformers' own `SmolVLMVideoProcessor.sample_frames` picks the frames
    (decoded with PyAV), each frame is built as an image the way that processor does (longest
    edge to the video size, bumped to even, then the crop-size square; Lanczos; normalised), and
    transformers' own `SmolVLMProcessor.replace_video_token` writes the prompt (num2words replaced
    by a table). Returns (input_ids, pixel_values (1, frames, 3, crop, crop))."""
    from types import SimpleNamespace

    import av
    import numpy as np
    from PIL import Image
    from transformers import AutoTokenizer
    from transformers.models.smolvlm import processing_smolvlm
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor, get_resize_output_image_size
    from transformers.video_utils import VideoMetadata

    settings = json.loads((Path(folder) / "preprocessor_config.json").read_text())
    sampling, crop = settings["video_sampling"], settings["max_image_size"]["longest_edge"]
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate)
        frames = [f.to_image().convert("RGB") for f in container.decode(stream)]
    meta = VideoMetadata(total_num_frames=len(frames), fps=fps, duration=len(frames) / fps)
    indices = SmolVLMVideoProcessor.sample_frames(SimpleNamespace(num_frames=sampling["max_frames"], fps=sampling["fps"]), meta)
    meta.frames_indices = indices
    mean, std = np.array(settings["image_mean"])[:, None, None], np.array(settings["image_std"])[:, None, None]
    pixels = []
    for i in indices:
        im = frames[i]
        h, w = get_resize_output_image_size(torch.zeros(3, im.height, im.width), sampling["video_size"]["longest_edge"])
        im = im.resize((w, h), Image.LANCZOS).resize((crop, crop), Image.LANCZOS)
        pixels.append(torch.from_numpy(((np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255 - mean) / std).astype(np.float32)))
    pixel_values = torch.stack(pixels)[None]
    proc = SimpleNamespace(image_seq_len=json.loads((Path(folder) / "processor_config.json").read_text())["image_seq_len"],
                           image_token="<image>", fake_image_token="<fake_token_around_image>", global_image_token="<global-img>")
    saved, processing_smolvlm.num2words = processing_smolvlm.num2words, _WORDS.__getitem__
    try:
        video_text = processing_smolvlm.SmolVLMProcessor.replace_video_token(
            proc, {"pixel_values": pixel_values, "video_metadata": [meta]}, 0)
    finally:
        processing_smolvlm.num2words = saved
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    content = [{"type": "text", "text": text}, {"type": "video"}]
    rendered = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False,
                                       chat_template=processing_smolvlm.DEFAULT_CHAT_TEMPLATE)
    ids = tok(rendered.replace("<video>", video_text), add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ids, pixel_values


def _parity_reference(folder, image, question, prompt, model):
    assert family_of(model) == "smolvlm"
    ids, pixels = smolvlm_reference_inputs(folder, [image], [{"type": "image"}, {"type": "text", "text": question}])
    assert model.count_image_tokens(prompt.images[0]) == int((ids == model.image_token_id).sum())
    ours_pixels = prompt.images[0].pixel_values
    std = torch.tensor(model.config.processor.std)[:, None, None]
    assert ours_pixels.shape == pixels[0].shape
    assert ((ours_pixels - pixels[0]).abs() * std).max() <= PIXEL_TOLERANCE + 1e-6
    return ids[0], {"pixel_values": ours_pixels[None]}


PARITY = ParityCase("smolvlm", save_smolvlm, "SmolVLMForConditionalGeneration", _parity_reference,
                    sizes=((20, 20), (72, 40), (24, 90), (100, 100)), image_text="<image>")
