"""Pixtral (LLaVA with a Pixtral tower) and Mistral3 through `vlmkit import-hf` against
transformers on tiny random folders saved with `save_pretrained`: two images in one prompt give
the input ids and [IMG] counts transformers' PixtralProcessor builds, pixel values within
docs/preprocessing.md's tolerance, logits within 1e-4 (fp32), the same greedy tokens; export back
returns the same tensors and transformers' reload of the export matches; vlmkit's own Pixtral
tower (`rope-vit`). One image per prompt: tests/families/test_hf_parity.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _cli import vlmkit
from _parity import first_stop, noise
from _tiny import tiny_config
from PIL import Image
from pixtral_folder import check_pixels, pixtral_reference, save_mistral3, save_pixtral

from vlmkit.checkpoint import load_checkpoint
from vlmkit.data.formats import Message
from vlmkit.generate import GenerationConfig, generate
from vlmkit.hf.registry import export_hf, family_for, family_of, import_hf, verify_hf_export
from vlmkit.model.vlm import VisionLanguageModel
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module", params=["pixtral", "mistral3"])
def family(tmp_path_factory, request):
    root = tmp_path_factory.mktemp(request.param)
    folder = (save_pixtral if request.param == "pixtral" else save_mistral3)(root / "hf")
    ckpt = import_hf(folder, root / "vlmkit")
    model, _ = load_checkpoint(ckpt)
    return request.param, folder, ckpt, model


def test_two_images_in_one_prompt_match_transformers(family):
    from transformers import AutoModelForImageTextToText

    name, folder, _, model = family
    sizes = [(60, 30), (30, 90)]
    images = [noise(w, h, seed=i + 3) for i, (w, h) in enumerate(sizes)]
    ref_ids, ref_px = pixtral_reference(folder, images, "Describe the picture.")
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>" * len(images) + "Describe the picture.")], images)
    assert prompt.input_ids.tolist() == ref_ids.tolist()
    assert sum(model.count_image_tokens(im) for im in prompt.images) == int((ref_ids == model.image_token_id).sum())
    pixels = check_pixels(prompt, ref_px, model)

    ref = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    assert type(ref).__name__ == {"pixtral": "LlavaForConditionalGeneration", "mistral3": "Mistral3ForConditionalGeneration"}[name]
    ids = prompt.input_ids[None]
    inputs = {"input_ids": ids, "pixel_values": pixels, "image_sizes": ref_px["image_sizes"]}
    with torch.no_grad():
        ours = model(ids, visuals=VisualBatch(prompt.images)).logits
        theirs = ref(**inputs).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)

    expected = generate(model, [prompt], GenerationConfig(max_new_tokens=8))[0]
    out = ref.generate(**inputs, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = ref.generation_config.eos_token_id
    assert first_stop(out, set(eos if isinstance(eos, list) else [eos])) == expected


def test_import_reads_the_folder_settings(family):
    name, _, ckpt, model = family
    p = model.config.processor
    assert p.name == "pixtral" and p.options["patch_size"] == 4 and p.options["longest_edge"] == 64
    assert p.options["spatial_merge"] == (2 if name == "mistral3" else 1)
    assert tuple(p.mean) == pytest.approx((0.5, 0.4, 0.3)) and tuple(p.std) == pytest.approx((0.25, 0.3, 0.35))
    assert model.config.connector.name == ("patch-merger" if name == "mistral3" else "mlp")
    assert model.config.image_token == "[IMG]"
    assert model.pretrained_parts == {"llm"} and (ckpt / "llm" / "model.safetensors").is_file()
    assert family_of(model) == ("mistral3" if name == "mistral3" else "llava")


def test_export_then_import_returns_the_same_tensors(family, tmp_path):
    _, _, _, model = family
    exported = export_hf(model, tmp_path / "hf")
    assert (exported / "preprocessor_config.json").is_file() and (exported / "chat_template.jinja").is_file()
    assert verify_hf_export(model, exported) < 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert again.config.processor == model.config.processor
    assert again.config.connector == model.config.connector


def test_a_tied_head_and_projector_biases_import_with_equal_logits(tmp_path):
    """Mistral3Config ties the head to the embeddings by default (the file then holds no
    lm_head.weight); a projector with biases maps too."""
    from transformers import Mistral3ForConditionalGeneration

    folder = save_mistral3(tmp_path / "hf", seed=2, tied=True, bias=True)
    model, _ = load_checkpoint(import_hf(folder, tmp_path / "vlmkit"))
    assert model.llm.config.tie_word_embeddings and model.config.connector.options["bias"]
    image = noise(50, 30, seed=4)
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>What?")], [image])
    ref = Mistral3ForConditionalGeneration.from_pretrained(folder, local_files_only=True).eval()
    pixels = prompt.images[0].pixel_values
    with torch.no_grad():
        ours = model(prompt.input_ids[None], visuals=VisualBatch(prompt.images)).logits
        theirs = ref(input_ids=prompt.input_ids[None], pixel_values=pixels, image_sizes=torch.tensor([list(pixels.shape[-2:])])).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    exported = export_hf(model, tmp_path / "export")
    assert verify_hf_export(model, exported) < 1e-4


def test_a_llava_folder_without_a_pixtral_tower_stays_with_llava_1_5():
    assert family_for("llava", {"vision_config": {"model_type": "clip_vision_model"}}).description.startswith("LLaVA-1.5")
    assert family_for("llava", {"vision_config": {"model_type": "pixtral"}}).description.startswith("Pixtral")


def test_a_pixtral_folder_that_drops_the_first_patch_is_refused(tmp_path):
    import json

    from vlmkit.hf.folder import ExportError

    folder = save_pixtral(tmp_path / "hf", seed=1)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision_feature_select_strategy"] = "default"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="vision_feature_select_strategy"):
        import_hf(folder, tmp_path / "out")


def test_patch_merger_connector_matches_mistral3s_projector():
    from transformers import Mistral3Config
    from transformers.models.mistral3.modeling_mistral3 import Mistral3MultiModalProjector

    from vlmkit.model.connectors import build_connector

    torch.manual_seed(0)
    cfg = Mistral3Config(vision_config={"model_type": "pixtral", "hidden_size": 16, "patch_size": 4, "num_attention_heads": 2},
                         text_config={"model_type": "mistral", "hidden_size": 24, "rms_norm_eps": 1e-5}, spatial_merge_size=2,
                         multimodal_projector_bias=True)
    theirs = Mistral3MultiModalProjector(cfg).eval()
    with torch.no_grad():
        theirs.norm.weight.uniform_(0.5, 1.5)
    ours = build_connector("patch-merger", 16, 24, {"merge": 2, "norm_eps": 1e-5})
    names = {"norm.weight": "norm.weight", "merging_layer.weight": "patch_merger.merging_layer.weight", "fc1.weight": "linear_1.weight",
             "fc1.bias": "linear_1.bias", "fc2.weight": "linear_2.weight", "fc2.bias": "linear_2.bias"}
    ours.load_state_dict({k: theirs.state_dict()[v] for k, v in names.items()})
    feats = torch.randn(2, 6 * 4, 16)  # two images of a 6x4 patch grid (24x16 px)
    with torch.no_grad():
        got = ours(feats, (6, 4))
        want = theirs(feats.reshape(-1, 16), torch.tensor([[24, 16], [24, 16]]))
    assert got.shape == (2, 6, 24) and ours.num_tokens((6, 4)) == 6 and ours.output_grid((6, 4)) == (3, 2)
    torch.testing.assert_close(got.reshape(-1, 24), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="merges 2x2"):
        ours.check_grid((5, 4))


def test_pixtral_processor_resizes_to_whole_merge_blocks():
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    from vlmkit.families.pixtral.processor import PixtralProcessor

    ours = PixtralProcessor(longest_edge=64, patch_size=4, spatial_merge=2, backend="pil")
    ref = PixtralImageProcessorPil(size={"longest_edge": 64}, patch_size=8)
    for w, h in [(37, 11), (100, 30), (9, 9), (64, 64)]:
        image = noise(w, h, seed=w)
        layout = ours.layout(w, h)
        want = ref(images=[image], return_tensors="pt")["image_sizes"][0].tolist()
        assert layout.parts["resized"] == want[::-1]
        assert layout.visual_tokens == (want[0] // 8) * (want[1] // 8)


def test_imported_mistral3_chats_through_the_cli(tmp_path):
    save_mistral3(tmp_path / "hf", seed=5)
    vlmkit(tmp_path, "import-hf", "hf", "ckpt")
    Image.new("RGB", (37, 111), (200, 40, 40)).save(tmp_path / "odd.png")
    answer = vlmkit(tmp_path, "chat", "--checkpoint", "ckpt", "--image", "odd.png", "What colour is the image?", "--max-new-tokens", "4")
    assert answer.stdout.endswith("\n") and "Traceback" not in answer.stderr


# ---- vlmkit's own Pixtral tower (rope-vit) ------------------------------------------------------


def test_rope_vit_head_dim_must_split_into_rows_and_columns():
    cfg = tiny_config("native")
    cfg.vision.config = {**cfg.vision.config, "hidden_size": 12, "num_attention_heads": 2}
    with pytest.raises(ValueError, match="multiple of 4"):
        VisionLanguageModel.build(cfg, pretrained=False)


def test_rope_vit_matches_pixtral_vision_param_count():
    from transformers import PixtralVisionConfig, PixtralVisionModel

    from vlmkit.families.pixtral.model import RopeViTConfig, RopeViTTower

    hf = PixtralVisionModel(PixtralVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, patch_size=8, image_size=64))
    ours = RopeViTTower(RopeViTConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, patch_size=8))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(hf)


def test_rope_2d_scores_depend_only_on_relative_offsets():
    from vlmkit.families.pixtral.model import apply_rope, rope_2d_angles

    torch.manual_seed(0)
    q, k = torch.randn(16), torch.randn(16)
    angles = rope_2d_angles(6, 6, 16, 100.0).view(6, 6, 8)

    def score(a, b):
        return apply_rope(q[None], angles[a][None]) @ apply_rope(k[None], angles[b][None]).T

    base = score((1, 2), (3, 1))
    torch.testing.assert_close(score((2, 4), (4, 3)), base)  # both shifted by (1, 2)
    assert not torch.allclose(score((1, 2), (1, 3)), base)
