"""Llama 3.2 Vision (`mllama`) through `vlmkit import-hf` against transformers on a tiny random
folder saved with `save_pretrained`: two and interleaved images (ids, aspect-ratio ids / masks and
the cross_attention_mask transformers' MllamaProcessor builds, pixels within docs/preprocessing.md's
tolerance, logits within 1e-4 (fp32) and the same greedy tokens; one image on several sizes:
tests/families/test_hf_parity.py), the folder settings it reads, export back returning the same
tensors, the visibility rule, and the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _cli import vlmkit
from _parity import first_stop, import_tiny, noise
from mllama_folder import check_inputs, save_mllama
from PIL import Image

from vlmkit.checkpoint import load_checkpoint
from vlmkit.core.types import Message
from vlmkit.generate import GenerationConfig, generate
from vlmkit.hf.registry import export_hf, family_of, import_hf, verify_hf_export
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def mllama(tmp_path_factory):
    return import_tiny(tmp_path_factory.mktemp("mllama"), save_mllama)


# (image sizes, text between the images or None: adjacent images); one image: the parity case.
CASES = {"two-images": ([(60, 30), (30, 90)], None), "interleaved": ([(40, 40), (50, 20)], "then")}


@pytest.mark.parametrize("case", list(CASES))
def test_import_ids_masks_pixels_logits_and_greedy_match_transformers(mllama, case):
    from transformers import MllamaForConditionalGeneration

    folder, _, model = mllama
    sizes, between = CASES[case]
    images = [noise(w, h, seed=i + 7) for i, (w, h) in enumerate(sizes)]
    content = [{"type": "image"}]
    ours_text = "<image>"
    for _ in images[1:]:
        if between:
            content.append({"type": "text", "text": between})
            ours_text += between
        content.append({"type": "image"})
        ours_text += "<image>"
    content.append({"type": "text", "text": "What is shown?"})
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", ours_text + "What is shown?")], images)
    _, inputs = check_inputs(folder, images, content, prompt, model)
    ids = prompt.input_ids[None]

    ref = MllamaForConditionalGeneration.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(ids, visuals=VisualBatch(prompt.images)).logits
        theirs = ref(input_ids=ids, **inputs).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)

    expected = generate(model, [prompt], GenerationConfig(max_new_tokens=8))[0]
    out = ref.generate(input_ids=ids, **inputs, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:].tolist()
    eos = ref.generation_config.eos_token_id
    assert first_stop(out, set(eos if isinstance(eos, list) else [eos])) == expected


def test_the_image_reaches_the_logits(mllama):
    """The folder's gates are open: another image changes the logits after its marker."""
    _, _, model = mllama
    proc = build_chat_processor(model, 4096)
    a = proc.encode_prompt([Message("user", "<image>What?")], [noise(40, 40, seed=1)])
    b = proc.encode_prompt([Message("user", "<image>What?")], [noise(40, 40, seed=2)])
    with torch.no_grad():
        la = model(a.input_ids[None], visuals=VisualBatch(a.images)).logits
        lb = model(b.input_ids[None], visuals=VisualBatch(b.images)).logits
    assert (la - lb).abs().max() > 1e-2


def test_import_reads_the_folder_settings(mllama):
    _, ckpt, model = mllama
    p = model.config.processor
    assert p.name == "mllama" and p.image_size == 16 and p.options["max_tiles"] == 4 and p.options["pad_tiles"]
    assert tuple(p.mean) == pytest.approx((0.5, 0.4, 0.3)) and tuple(p.std) == pytest.approx((0.25, 0.3, 0.35))
    assert model.config.fusion == "cross-attention" and model.config.connector.options["cross_attention"] == {"layers": "llm"}
    assert model.config.vision.name == "mllama-vit" and model.config.llm.name == "mllama-text"
    assert model.image_token_id == model.llm.config.vocab_size  # past the head, inside the embedding table
    assert model.pretrained_parts == {"llm"} and (ckpt / "llm" / "model.safetensors").is_file()
    assert family_of(model) == "mllama"


def test_export_then_import_returns_the_same_tensors(mllama, tmp_path):
    _, _, model = mllama
    exported = export_hf(model, tmp_path / "hf")
    assert (exported / "processor_config.json").is_file() and (exported / "chat_template.jinja").is_file()
    assert verify_hf_export(model, exported) < 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    la, lb = model.llm.state_dict(), again.llm.state_dict()
    assert sorted(la) == sorted(lb) and all(torch.equal(la[k], lb[k]) for k in la)
    assert again.config.processor == model.config.processor


def test_bad_folders_are_refused_naming_the_file_or_tensor(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from vlmkit.hf.folder import ExportError

    folder = save_mllama(tmp_path / "hf", seed=1)
    state = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k != "multi_modal_projector.bias"}, str(folder / "model.safetensors"))
    with pytest.raises(ExportError, match="multi_modal_projector.weight / .bias"):
        import_hf(folder, tmp_path / "out")
    save_file({k: v for k, v in state.items() if "cross_attn_mlp_gate" not in k}, str(folder / "model.safetensors"))
    with pytest.raises(ExportError, match="cross_attn_mlp_gate"):
        import_hf(folder, tmp_path / "out")
    save_file(state, str(folder / "model.safetensors"))
    settings = json.loads((folder / "processor_config.json").read_text())
    settings["image_processor"]["max_image_tiles"] = 2
    (folder / "processor_config.json").write_text(json.dumps(settings))
    with pytest.raises(ExportError, match="max_image_tiles 2 differs from the vision tower's max_num_tiles 4"):
        import_hf(folder, tmp_path / "out")


@pytest.mark.parametrize("ids", [[5, 9, 1, 2], [9, 1, 2, 3], [1, 9, 2, 9, 3], [9, 9, 1, 2, 9, 3], [9, 1, 9, 9, 2], [1, 2]])
def test_image_ranges_follow_transformers(ids):
    from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

    from vlmkit.families.mllama.model import image_ranges

    theirs = [(a, len(ids) if b == -1 else b) for a, b in get_cross_attention_token_mask(ids, 9)]
    assert image_ranges([i for i, t in enumerate(ids) if t == 9], len(ids)) == theirs


def test_llm_cross_attention_layers_need_an_llm_that_has_them():
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlmkit.model.cross_attention import LLMCrossAttention, parse_cross_attention_options

    llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50))
    with pytest.raises(ValueError, match="has none: use layers: added"):
        LLMCrossAttention(llm, parse_cross_attention_options({"layers": "llm"}))
    with pytest.raises(ValueError, match=r"\['every'\] only apply to added blocks"):
        LLMCrossAttention(llm, parse_cross_attention_options({"layers": "llm", "every": 2}))


def test_imported_mllama_chats_and_fine_tunes_through_the_cli(tmp_path):
    import yaml

    save_mllama(tmp_path / "hf", seed=3)
    vlmkit(tmp_path, "import-hf", "hf", "ckpt")
    Image.new("RGB", (37, 111), (200, 40, 40)).save(tmp_path / "odd.png")
    answer = vlmkit(tmp_path, "chat", "--checkpoint", "ckpt", "--image", "odd.png", "What colour is the image?", "--max-new-tokens", "4")
    assert answer.stdout.endswith("\n") and "Traceback" not in answer.stderr
    vlmkit(tmp_path, "data", "synth-train", "data", "--n", "8", "--n-test", "2", "--n-video", "0")
    recipe = {"model": {"init_from": str(tmp_path / "ckpt")},
              "train": {"output_dir": "runs/lora", "max_length": 2048,
                        "stages": {"lora": {"data": "data/train.json", "trainable": ["llm"], "lr": 1e-3, "batch_size": 2, "max_steps": 2,
                                            "lora": {"parts": ["llm"], "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}}}}}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(recipe))
    vlmkit(tmp_path, "train", "lora.yaml")
    trained = tmp_path / "runs" / "lora" / "checkpoints" / "lora"
    assert (trained / "adapters.safetensors").is_file()
    answer = vlmkit(tmp_path, "chat", "--checkpoint", str(trained), "--image", "odd.png", "What colour?", "--max-new-tokens", "3")
    assert "Traceback" not in answer.stderr
