"""`vlmkit import-hf` for BLIP-2 (OPT LLM) and InstructBLIP (Llama LLM) on tiny random folders
saved with `save_pretrained`: the processor settings it reads, export back returning the same
tensors (transformers' reload of the export matches), the prompt layout, the instruction reaching
the Q-Former, and the command line. Ids, Q-Former ids, pixels, logits within 1e-4 (fp32) and greedy
tokens against transformers: tests/families/test_hf_parity.py (the `blip2` and
`blip2/instructblip` cases), and below for the instructions the parity cases do not ask. The
Q-Former's instruction input is a general connector mechanism, tested on its own too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _parity import first_stop, noise
from blip2_folder import check_inputs, hf_processor, save_blip

from vlmkit.checkpoint import load_checkpoint
from vlmkit.core.types import Message, Sample
from vlmkit.generate import GenerationConfig, generate
from vlmkit.hf.folder import ExportError
from vlmkit.hf.registry import export_hf, import_hf, verify_hf_export
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

REPO = Path(__file__).resolve().parents[3]

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=["blip-2", "instructblip"])
def blip(tmp_path_factory, request):
    instruct = request.param == "instructblip"
    root = tmp_path_factory.mktemp(request.param)
    folder = save_blip(root / "hf", instruct=instruct, llm="llama" if instruct else "opt")
    ckpt = import_hf(folder, root / "vlmkit")
    model, _ = load_checkpoint(ckpt)
    return instruct, folder, ckpt, model


@pytest.mark.parametrize("size,text", [((28, 28), "Question: what colour? Answer:"), ((20, 90), "Describe it.")])
def test_blip_logits_and_greedy_match_transformers_for_other_instructions(blip, size, text):
    """The parity cases ask "What is shown?"; the Q-Former of InstructBLIP reads the instruction,
    so two more instructions (of other lengths) go through logits and greedy decoding here."""
    from transformers import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

    instruct, folder, _, model = blip
    image = noise(*size, seed=sum(size))
    prompt = build_chat_processor(model, 4096).encode_prompt([Message("user", "<image>" + text)], [image])
    inputs = check_inputs(folder, image, text, prompt, model, instruct)

    cls = InstructBlipForConditionalGeneration if instruct else Blip2ForConditionalGeneration
    ref = cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = model(prompt.input_ids[None], visuals=VisualBatch(prompt.images)).logits
        theirs = ref(**inputs).logits
    assert ours.shape == theirs.shape  # no vocabulary growth on import
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)

    expected = generate(model, [prompt], GenerationConfig(max_new_tokens=8))[0]
    out = ref.generate(**inputs, max_new_tokens=8, do_sample=False)[0].tolist()
    out = out[len(prompt.input_ids):] if out[: len(prompt.input_ids)] == prompt.input_ids.tolist() else out
    eos = ref.generation_config.eos_token_id
    assert first_stop(out, set(eos if isinstance(eos, list) else [eos])) == expected


def test_blip_import_reads_processor_settings(blip):
    instruct, _, ckpt, model = blip
    p = model.config.processor
    assert p.name == "fixed" and p.options["fit"] == "squash" and p.image_size == 28
    assert tuple(p.mean) == pytest.approx((0.5, 0.4, 0.3)) and tuple(p.std) == pytest.approx((0.25, 0.3, 0.35))
    assert model.config.connector.name == "qformer" and model.config.vision.name == "hf-blip"
    assert model.connector.reads_instruction == instruct
    assert model.pretrained_parts == {"llm"} and (ckpt / "llm" / "model.safetensors").is_file()
    assert (ckpt / "llm" / "qformer_tokenizer").is_dir() == instruct


def test_blip_export_then_import_returns_the_same_tensors(blip, tmp_path):
    instruct, _, _, model = blip
    exported = export_hf(model, tmp_path / "hf")
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == ("instructblip" if instruct else "blip-2")
    assert (exported / "qformer_tokenizer").is_dir() == instruct
    assert verify_hf_export(model, exported) < 1e-4
    again, _ = load_checkpoint(import_hf(exported, tmp_path / "again"))
    sa, sb = model.state_dict(), again.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert again.config.processor == model.config.processor
    assert again.config.connector == model.config.connector


def test_blip_prompt_layout_puts_images_first_and_bos_before_the_text(blip):
    """Blip2Processor's layout for any placement of the placeholder, a text-only prompt (BOS
    first) and a training sample (assistant answer supervised, after a space, ending in EOS)."""
    instruct, folder, _, model = blip
    hf = hf_processor(folder, instruct)
    chat = build_chat_processor(model, 4096)
    image = noise(30, 30, seed=1)
    late = chat.encode_prompt([Message("user", "Look: <image>")], [image])
    assert late.input_ids.tolist() == hf(images=image, text="Look: ", return_tensors="pt")["input_ids"][0].tolist()
    # vlmkit's chat / eval write "<image>\n" before the question: the newline is no part of the text.
    chatty = chat.encode_prompt([Message("user", "<image>\nWhat is it?")], [image])
    reference = hf(images=image, text="What is it?", return_tensors="pt")
    assert chatty.input_ids.tolist() == reference["input_ids"][0].tolist()
    if instruct:
        assert chatty.images[0].instruction_ids.tolist() == reference["qformer_input_ids"][0].tolist()
    text_only = chat.encode_prompt([Message("user", "Hello")], [])
    assert text_only.input_ids.tolist() == hf.tokenizer("Hello")["input_ids"]
    path = folder / "img.png"
    image.save(path)
    sample = Sample(id="s", messages=[Message("user", "<image>Question: colour? Answer:"), Message("assistant", "red")], images=[str(path)])
    enc = chat.encode(sample)
    supervised = enc.input_ids[enc.labels != -100].tolist()
    assert model.tokenizer.decode(supervised) == " red" + model.tokenizer.eos_token


def test_instructblip_image_tokens_depend_on_the_instruction(blip):
    instruct, _, _, model = blip
    if not instruct:
        pytest.skip("BLIP-2's Q-Former reads no text")
    chat = build_chat_processor(model, 4096)
    image = noise(40, 40, seed=3)
    a = chat.encode_prompt([Message("user", "<image>What colour?")], [image])
    b = chat.encode_prompt([Message("user", "<image>How many objects are there?")], [image])
    with torch.no_grad():
        ta, tb = model.image_tokens(a.images)[0], model.image_tokens(b.images)[0]
        # Both in one batch (different instruction lengths, padded) give the same tokens.
        both = model.image_tokens(a.images + b.images)
    assert (ta - tb).abs().max() > 1e-3
    torch.testing.assert_close(both[0], ta, atol=1e-5, rtol=0)
    torch.testing.assert_close(both[1], tb, atol=1e-5, rtol=0)


def test_release_name_resolves_to_the_blip2_preset():
    """The family's preset alias (in its entry) is known before any other registry lookup."""
    code = "from vlmkit import presets; print(presets.resolve('blip2-opt-2.7b'))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "blip2", out.stderr[-2000:]


# ---- the Q-Former connector's instruction input ---------------------------------------------


def test_qformer_text_input_pads_and_masks_instructions():
    from vlmkit.model.connectors import build_connector

    torch.manual_seed(0)
    opts = {"num_queries": 4, "hidden_size": 16, "layers": 2, "heads": 2, "intermediate_size": 32, "text_ffn": True,
            "text_vocab": 50, "max_text_positions": 8, "text_input": True}
    conn = build_connector("qformer", 12, 24, opts).eval()
    feats = torch.randn(3, 5, 12)
    texts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6, 7, 8]), None]
    with torch.no_grad():
        batched = conn(feats, (2, 2), texts=texts)
        alone = [conn(feats[i:i + 1], (2, 2), texts=[t]) for i, t in enumerate(texts)]
        queries_only = conn(feats[2:], (2, 2))
    assert batched.shape == (3, 4, 24)
    for i in range(3):
        torch.testing.assert_close(batched[i], alone[i][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[2], queries_only[0], atol=1e-5, rtol=0)
    assert (batched[0] - batched[1]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="longer than the Q-Former's 8 positions"):
        conn(feats[:1], (2, 2), texts=[torch.arange(9)])
    with pytest.raises(ValueError, match="text_input needs"):
        build_connector("qformer", 12, 24, {**opts, "text_ffn": False})


def test_blip_folder_with_an_encoder_decoder_llm_is_refused(tmp_path):
    folder = save_blip(tmp_path / "hf", image=14, queries=2)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["text_config"] = {"model_type": "t5", "d_model": 32, "num_layers": 1, "num_heads": 2, "d_ff": 64, "vocab_size": 300}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="encoder-decoder"):
        import_hf(folder, tmp_path / "out")


def test_instructblip_folder_without_its_qformer_tokenizer_is_refused(tmp_path):
    import shutil

    folder = save_blip(tmp_path / "hf", instruct=True, llm="llama", image=14, queries=2)
    shutil.rmtree(folder / "qformer_tokenizer")
    with pytest.raises(ExportError, match="qformer_tokenizer"):
        import_hf(folder, tmp_path / "out")


# ---- the command line ---------------------------------------------------------------------


def test_instructblip_imports_and_chats_from_the_command_line(tmp_path):
    save_blip(tmp_path / "hf", instruct=True, llm="llama")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}

    def run(args):
        out = subprocess.run([sys.executable, "-m", "vlmkit.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, f"vlmkit {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
        return out

    run(["import-hf", "hf", "imported"])
    noise(50, 30, seed=2).save(tmp_path / "odd.png")
    # The checkpoint moves as a folder: its LLM and Q-Former tokenizer come with it.
    (tmp_path / "imported").rename(tmp_path / "moved")
    answer = run(["chat", "--checkpoint", "moved", "--image", "odd.png", "What is it?", "--max-new-tokens", "4"])
    assert "Traceback" not in answer.stderr

    # Fine-tuning: LoRA on the LLM and the Q-Former trained, on samples whose instructions reach
    # the Q-Former through the data pipeline.
    run(["data", "synth-train", "data/synth", "--n", "12", "--n-test", "2", "--n-video", "0"])
    recipe = {"model": {"init_from": str(tmp_path / "moved")},
              "train": {"output_dir": "runs/iblip", "max_length": 1024,
                        "stages": {"lora": {"data": "data/synth/train.json", "trainable": ["llm", "connector"], "lr": 1e-3,
                                            "batch_size": 4, "max_steps": 2,
                                            "lora": {"parts": ["llm"], "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}}}}}
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(recipe))
    run(["train", "lora.yaml"])
    trained = tmp_path / "runs" / "iblip" / "checkpoints" / "lora"
    assert (trained / "adapters.safetensors").is_file()
    answer = run(["chat", "--checkpoint", str(trained), "--image", "odd.png", "What colour?", "--max-new-tokens", "3"])
    assert "Traceback" not in answer.stderr
