"""3D rotary positions (M-RoPE) for interleaved text, images and video, as the original
Qwen2-VL `get_rope_index` computes them: the position rule of any language model that declares
`position_rule = "mrope"` (`model.language.DecoderLM`; Qwen2-VL and Qwen2.5-VL's decoders, and
the rule GLM-4.1V and Qwen3-VL follow).

Every token gets a (temporal, height, width) triple:

* text: the same consecutive number on all three axes, starting at 0 or at one past the
  largest position used so far;
* a vision block over an LLM grid of t x h x w merged tokens (h, w already divided by the 2x2
  merge) starts at s = (previous maximum + 1) and gives the token at (i, j, k) the position
  (s + i, s + j, s + k), in row-major t, h, w order;
* text after a block resumes at the block's maximum + 1 = s + max(t, h, w).

Padding (attention_mask 0) is skipped and gets position 1, and the per-row delta
`max position + 1 - real length` is what generation adds to the step counter, as in the
original. Where transformers 5 differs from the original: it resumes text at
s + max(h, w) (ignoring t) and puts 0 on padding; see docs/multimodal.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# How a language model numbers its positions: "1d", one index per token (every causal LM), or
# "mrope", a (temporal, height, width) triple per token computed here (`sample_positions`).
POSITION_RULES = ("1d", "mrope")


def vision_block_positions(start: int, t: int, h: int, w: int) -> torch.Tensor:
    """(3, t*h*w) positions of one vision block whose first position is `start`."""
    tt = torch.arange(t).view(t, 1, 1).expand(t, h, w)
    hh = torch.arange(h).view(1, h, 1).expand(t, h, w)
    ww = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def row_positions(is_vision: Sequence[bool] | torch.Tensor, grids: Sequence[Sequence[int]]) -> torch.Tensor:
    """(3, T) positions of one unpadded row. `is_vision` marks visual-token slots; `grids` gives
    each block's LLM grid (t, h, w) in order; consecutive slots are cut into blocks by size."""
    flags = torch.as_tensor(is_vision, dtype=torch.bool).tolist()
    out = torch.empty(3, len(flags), dtype=torch.long)
    nxt, i, g = 0, 0, 0
    while i < len(flags):
        if flags[i]:
            if g >= len(grids):
                raise ValueError(f"more vision tokens than the {len(grids)} grid(s) given account for")
            t, h, w = (int(x) for x in grids[g])
            n = t * h * w
            if i + n > len(flags) or not all(flags[i : i + n]):
                raise ValueError(f"vision block {g} needs {n} consecutive vision tokens (grid {t}x{h}x{w}) at {i}")
            out[:, i : i + n] = vision_block_positions(nxt, t, h, w)
            nxt += max(t, h, w)
            i += n
            g += 1
        else:
            j = i
            while j < len(flags) and not flags[j]:
                j += 1
            out[:, i:j] = torch.arange(nxt, nxt + j - i)
            nxt += j - i
            i = j
    if g != len(grids):
        raise ValueError(f"{len(grids)} grid(s) given but {g} vision block(s) found")
    return out


def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (3, B, T) and deltas (B, 1) from token ids and the raw patch grids (t, h, w)
    of the batch's images and videos, in the order they appear (as Qwen2-VL's processor gives
    them). Image and video blocks consume their own grid lists."""
    B, T = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    if image_grid_thw is None and video_grid_thw is None:
        pos = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 1)
        deltas = pos.max(-1, keepdim=True).values + 1 - T
        return pos.unsqueeze(0).expand(3, -1, -1).clone(), deltas
    m = spatial_merge_size
    grids = {
        image_token_id: [] if image_grid_thw is None else [(int(t), int(h) // m, int(w) // m) for t, h, w in image_grid_thw.tolist()],
        video_token_id: [] if video_grid_thw is None else [(int(t), int(h) // m, int(w) // m) for t, h, w in video_grid_thw.tolist()],
    }
    used = {image_token_id: 0, video_token_id: 0}
    positions = torch.ones(3, B, T, dtype=torch.long)
    deltas = []
    for b in range(B):
        ids = input_ids[b][mask[b]].tolist()
        is_vision = [x in grids for x in ids]
        row_grids = []
        i = 0
        while i < len(ids):  # the grid of each block comes from its own token kind's list
            if is_vision[i]:
                kind = ids[i]
                if used[kind] >= len(grids[kind]):
                    raise ValueError(f"row {b}: more {'image' if kind == image_token_id else 'video'} blocks than grids")
                t, h, w = grids[kind][used[kind]]
                used[kind] += 1
                row_grids.append((t, h, w))
                i += t * h * w
            else:
                i += 1
        pos = row_positions(is_vision, row_grids)
        positions[:, b, mask[b]] = pos
        deltas.append(int(pos.max()) + 1 - len(ids))
    return positions, torch.tensor(deltas).unsqueeze(1)


def sample_positions(encoded, image_token_id: int | set[int]) -> torch.Tensor:
    """(3, T) M-RoPE positions of one `EncodedSample`, from its visual spans.

    A span with an LLM grid whose tokens form one run (a Qwen2-VL image, or a video in
    temporal patches) is one block over that grid. A video of several wrapped groups is one
    (1, h, w) block per group, and so is each frame of a grid whose frames are separated by
    text (Qwen3-VL's timestamps). Families without a grid (fixed, tiles ...) give each group a
    (1, 1, n) block: order and distinct positions, without claiming a 2D layout."""
    slots = image_token_id if isinstance(image_token_id, set) else {image_token_id}  # image (and video) slot tokens
    flags = [x in slots for x in encoded.input_ids.tolist()]
    where = [i for i, f in enumerate(flags) if f]
    blocks, k = [], 0
    for v in encoded.visuals:
        per_group = v.visual_tokens // v.groups
        first_run = _run_length(where, k, v.visual_tokens)
        k += v.visual_tokens
        if v.grid_thw is not None and v.groups == 1 and v.grid_thw[0] * v.grid_thw[1] * v.grid_thw[2] == v.visual_tokens:
            t, h, w = v.grid_thw
            # Frames separated by text (Qwen3-VL's and GLM-4.1V's timestamps): one (1, h, w) block per frame.
            blocks += [(1, h, w)] * t if t > 1 and first_run == h * w else [tuple(v.grid_thw)]
        elif v.grid_thw is not None and v.grid_thw[1] * v.grid_thw[2] == per_group:
            blocks += [(1, v.grid_thw[1], v.grid_thw[2])] * v.groups
        else:
            blocks += [(1, 1, per_group)] * v.groups
    return row_positions(flags, blocks)


def _run_length(where: list[int], k: int, n: int) -> int:
    """How many of the `n` slots from the k-th on lie next to each other from the first."""
    j = 1
    while j < n and k + j < len(where) and where[k + j] == where[k] + j:
        j += 1
    return j if k < len(where) else 0
