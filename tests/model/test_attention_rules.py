"""`model.attention` rules: the blocks they name, the prompt mask of a batch, and the decoder
masks they build, against a hand-written rule and against the masks transformers' PaliGemma
(prefix-LM) and Gemma 3 (bidirectional images, sliding windows) build from token_type_ids."""

from __future__ import annotations

import pytest
import torch

from vlmkit.model.attention import attention_rule, decoder_mask, image_blocks, prompt_mask

torch.set_num_threads(1)
IMG = 9


def _allowed(mask) -> torch.Tensor:
    """(B, Q, K) bool from a 4D bool (sdpa) or additive float (eager) mask."""
    m = mask[:, 0]
    return m if m.dtype == torch.bool else m == 0


def _gemma_config(model_type="gemma", attn="sdpa", **kw):
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                               num_hidden_layers=2, intermediate_size=32, vocab_size=32, **kw)
    cfg._attn_implementation = attn
    return cfg


def test_image_blocks_number_each_run_of_image_tokens():
    ids = torch.tensor([[1, IMG, IMG, 2, IMG, 3], [IMG, IMG, IMG, 4, 5, 6]])
    assert image_blocks(ids, IMG).tolist() == [[-1, 0, 0, -1, 1, -1], [0, 0, 0, -1, -1, -1]]


def test_prompt_mask_stops_at_the_first_supervised_token_per_sample():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, 8]])
    assert prompt_mask(labels, None).tolist() == [[True, True, False, False, False], [True, False, False, False, False]]
    # A packed row: two samples (segments 0, 1) and padding (-1); each sample has its own prompt.
    labels = torch.tensor([[-100, 4, 5, -100, -100, 6, -100]])
    segments = torch.tensor([[0, 0, 0, 1, 1, 1, -1]])
    assert prompt_mask(labels, segments).tolist() == [[True, False, False, True, True, False, False]]


def test_causal_rule_leaves_the_mask_alone():
    mask = torch.ones(1, 4, dtype=torch.long)
    assert decoder_mask(attention_rule("causal"), _gemma_config(), torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, 16),
                        mask, None, IMG) is mask


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_rule_matches_a_hand_written_prefix_lm_and_paligemmas_mask(attn):
    from transformers.masking_utils import create_causal_mask

    ids = torch.tensor([[0, IMG, IMG, 1, 2, 3, 4], [IMG, IMG, 5, 6, 7, 8, 9]])
    pad = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])  # row 0 left-padded
    prefix = torch.tensor([[False, True, True, True, True, False, False], [True, True, True, False, False, False, False]])
    cfg = _gemma_config(attn=attn)
    embeds = torch.zeros(2, 7, 16)
    ours = _allowed(decoder_mask(attention_rule("prefix"), cfg, ids, embeds, pad, None, IMG, prefix))
    T = ids.shape[1]
    q, k = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for b in range(2):
        want = ((k <= q) | (prefix[b][:, None] & prefix[b][None, :])) & pad[b].bool()[None, :]
        real = pad[b].bool()
        assert torch.equal(ours[b][real], want[real]), b
    # transformers' PaliGemma: token_type_ids 0 on the prefix -> block 0, suffix -> -1.
    token_type_ids = (~prefix).long()
    theirs = create_causal_mask(config=cfg, inputs_embeds=embeds, attention_mask=pad, cache=None, position_ids=None,
                                block_sequence_ids=torch.where(token_type_ids == 0, 0, -1))
    assert torch.equal(ours, _allowed(theirs))


def test_prefix_rule_without_a_prompt_mask_makes_the_whole_input_the_prompt():
    ids = torch.tensor([[IMG, 1, 2]])
    allowed = _allowed(decoder_mask(attention_rule("prefix"), _gemma_config(), ids, torch.zeros(1, 3, 16), None, None, IMG))
    assert allowed.all()


def test_image_rule_matches_gemma3s_masks_with_sliding_window():
    from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model, get_block_sequence_ids_for_mask

    cfg = _gemma_config("gemma3_text", sliding_window=3, layer_types=["sliding_attention", "full_attention"])
    ids = torch.tensor([[1, IMG, IMG, IMG, IMG, 2, 3, IMG, IMG, 4]])
    embeds = torch.zeros(1, 10, 16)
    pad = torch.ones(1, 10, dtype=torch.long)
    ours = decoder_mask(attention_rule("image"), cfg, ids, embeds, pad, None, IMG)
    theirs = create_masks_for_vision_model(config=cfg, inputs_embeds=embeds, attention_mask=pad, cache=None, position_ids=None,
                                           block_sequence_ids=get_block_sequence_ids_for_mask((ids == IMG).long()))
    for kind in ("full_attention", "sliding_attention"):
        assert torch.equal(_allowed(ours[kind]), _allowed(theirs[kind])), kind
    full = _allowed(ours["full_attention"])[0]
    assert full[1, 4] and full[4, 1] and not full[1, 7] and full[8, 7] and full[7, 8] and not full[5, 6]


def test_model_config_refuses_an_unknown_rule():
    from vlmkit.config import ModelConfig

    with pytest.raises(ValueError, match="unknown attention rule 'bidi'.*causal, image, prefix"):
        ModelConfig(attention="bidi")


def test_prefix_rule_keeps_the_samples_of_a_packed_row_apart():
    from vlmkit.model.attention import _prefix_blocks

    prefix = torch.tensor([[True, True, False, True, True, True, False]])
    assert _prefix_blocks(torch.zeros(1, 7, dtype=torch.long), IMG, prefix).tolist() == [[0, 0, -1, 1, 1, 1, -1]]
    # Positions restart per sample: transformers' packed-sequence mask keeps them apart too.
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    allowed = _allowed(decoder_mask(attention_rule("prefix"), _gemma_config(), torch.zeros(1, 7, dtype=torch.long),
                                    torch.zeros(1, 7, 16), None, positions, IMG, prefix))[0]
    assert allowed[0, 1] and allowed[3, 5] and not allowed[3, 1] and not allowed[1, 3] and not allowed[2, 3]


def test_the_schema_names_every_implemented_rule():
    from vlmkit.config import ATTENTION_RULE_NAMES
    from vlmkit.model.attention import ATTENTION_RULES

    assert sorted(ATTENTION_RULE_NAMES) == ATTENTION_RULES.names()
