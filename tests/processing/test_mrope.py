"""M-RoPE positions against transformers' Qwen2-VL `get_rope_index` and the original rule."""

from __future__ import annotations

import types

import pytest
import torch

from vlmkit.processing.mrope import get_rope_index, row_positions, sample_positions

IMG, VID, START, END = 151655, 151656, 151652, 151653


def reference(input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None, merge=2):
    """transformers' Qwen2VLModel.get_rope_index, called on a stand-in `self` (no weights needed)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

    fake = types.SimpleNamespace(config=types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=merge)))
    fake.get_vision_position_ids = lambda *a, **k: Qwen2VLModel.get_vision_position_ids(fake, *a, **k)
    types_ = (input_ids == IMG).int() + 2 * (input_ids == VID).int()
    return Qwen2VLModel.get_rope_index(fake, input_ids, types_, image_grid_thw, video_grid_thw, attention_mask)


def row(*parts) -> list[int]:
    """parts: ints (text tokens), ("img", t, h, w) or ("vid", t, h, w) raw grids (merged by 2)."""
    out = []
    for p in parts:
        if isinstance(p, tuple):
            kind, t, h, w = p
            out += [START] + [IMG if kind == "img" else VID] * (t * h * w // 4) + [END]
        else:
            out += [100 + k for k in range(p)]
    return out


def test_original_docstring_example_and_transformers_divergence():
    # Qwen2-VL's own example: a 3x2x2 (merged) video then 5 text tokens; text resumes at max + 1 = 3.
    ids = torch.tensor([[VID] * 12 + [7] * 5])
    pos, delta = get_rope_index(ids, video_grid_thw=torch.tensor([[3, 4, 4]]), image_token_id=IMG, video_token_id=VID)
    assert pos[0, 0].tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3, 4, 5, 6, 7]
    assert pos[1, 0].tolist() == [0, 0, 1, 1] * 3 + [3, 4, 5, 6, 7]
    assert pos[2, 0].tolist() == [0, 1, 0, 1] * 3 + [3, 4, 5, 6, 7]
    assert delta.tolist() == [[8 - 17]]
    # transformers 5 resumes at start + max(h, w) and so reuses temporal position 2 for text.
    ref, _ = reference(ids, video_grid_thw=torch.tensor([[3, 4, 4]]))
    assert ref[0, 0, 12:].tolist() == [2, 3, 4, 5, 6]


@pytest.mark.parametrize("seed", range(6))
def test_matches_transformers_on_interleaved_batches(seed):
    g = torch.Generator().manual_seed(seed)
    rows, images, videos = [], [], []
    for _ in range(3):
        parts = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
            parts.append(int(torch.randint(1, 6, (1,), generator=g)))
            h, w = (2 * int(x) for x in torch.randint(1, 4, (2,), generator=g))
            if torch.rand(1, generator=g) < 0.5:
                parts.append(("img", 1, h, w))
                images.append([1, h, w])
            else:
                # t <= max(h, w) / 2: where transformers 5 and the original agree
                t = int(torch.randint(1, max(h, w) // 2 + 1, (1,), generator=g))
                parts.append(("vid", t, h, w))
                videos.append([t, h, w])
        parts.append(int(torch.randint(0, 4, (1,), generator=g)))
        rows.append(row(*parts))
    longest = max(map(len, rows))
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):  # left padding, as in batched generation
        ids[b, longest - len(r):] = torch.tensor(r)
        mask[b, longest - len(r):] = 1
    grids = dict(image_grid_thw=torch.tensor(images) if images else None, video_grid_thw=torch.tensor(videos) if videos else None)
    pos, delta = get_rope_index(ids, attention_mask=mask, image_token_id=IMG, video_token_id=VID, **grids)
    ref_pos, ref_delta = reference(ids, attention_mask=mask, **grids)
    real = mask.bool()
    assert torch.equal(pos[:, real], ref_pos[:, real])
    assert torch.equal(delta.flatten(), ref_delta.flatten())
    assert (pos[:, ~real] == 1).all()  # the original's padding value


def test_text_only_and_errors():
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.tensor([[0, 1, 1, 1]])
    pos, delta = get_rope_index(ids, attention_mask=mask, image_token_id=IMG, video_token_id=VID)
    assert pos[:, 0].tolist() == [[1, 0, 1, 2]] * 3 and delta.tolist() == [[3 - 4]]
    with pytest.raises(ValueError, match="grid"):
        row_positions([True] * 5, [(1, 2, 2)])
    with pytest.raises(ValueError, match="more image blocks"):
        get_rope_index(torch.tensor([[START, IMG, END]]), image_grid_thw=torch.zeros(0, 3, dtype=torch.long),
                       image_token_id=IMG, video_token_id=VID)


def test_sample_positions_from_qwen2vl_encoding(tmp_path):
    """An encoded two-image prompt: each image is its own 2D block, text resumes past each one."""
    from PIL import Image

    from vlmkit.data.formats import Message
    from vlmkit.processing.prompt import ChatProcessor
    from vlmkit.families.qwen2_vl.processor import Qwen2VLProcessor
    from vlmkit.tokenizer import byte_level_tokenizer

    tok = byte_level_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<|vision_start|>", "<|vision_end|>"]},
                           replace_extra_special_tokens=False)
    proc = ChatProcessor(tok, Qwen2VLProcessor(min_pixels=56 * 56, max_pixels=112 * 112), "<image>", 4096)
    enc = proc.encode_prompt([Message("user", "<image> and <image>?")],
                             [Image.new("RGB", (112, 56), "red"), Image.new("RGB", (56, 112), "blue")])
    image_id = tok.convert_tokens_to_ids("<image>")
    pos = sample_positions(enc, image_id)
    ids = enc.input_ids.tolist()
    slots = [i for i, x in enumerate(ids) if x == image_id]
    assert [v.grid_thw for v in enc.visuals] == [(1, 2, 4), (1, 4, 2)]
    first, second = slots[:8], slots[8:]
    s = int(pos[0, first[0]])
    assert pos[:, first].tolist() == [[s] * 8, [s] * 4 + [s + 1] * 4, [s, s + 1, s + 2, s + 3] * 2]
    assert pos[0, first[-1] + 1] == s + 4  # the block's maximum + 1
    s2 = int(pos[0, second[0]])
    assert pos[1, second].tolist() == [s2, s2, s2 + 1, s2 + 1, s2 + 2, s2 + 2, s2 + 3, s2 + 3]
    ref, _ = reference(enc.input_ids[None].masked_fill(enc.input_ids[None] == image_id, IMG),
                       image_grid_thw=torch.tensor([[1, 4, 8], [1, 8, 4]]))
    assert torch.equal(pos, ref[:, 0])
