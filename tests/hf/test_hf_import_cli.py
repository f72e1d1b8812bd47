"""An imported Hugging Face folder is a vlmkit model like any other, driven through the `vlmkit`
command in a fresh folder: `import-hf`, `chat --checkpoint` on odd image sizes, `eval run -m
vlmkit:DIR`, and `train` with `model.init_from` and a LoRA stage, then `chat` on its result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from llava_next_folder import save_llava_next  # noqa: E402
from qwen2_vl_folder import save_qwen2vl  # noqa: E402

VLMKIT = [sys.executable, "-m", "vlmkit.cli"]
torch.set_num_threads(1)


def run(args, cwd, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(VLMKIT + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"vlmkit {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imported")
    run(["data", "synth-train", "data/synth", "--n", "32", "--n-test", "6", "--n-video", "0"], root)
    return root


@pytest.mark.parametrize("family", ["qwen2-vl", "llava-next"])
def test_imported_folder_chats_evaluates_and_fine_tunes_with_lora(workdir, family):
    save = save_qwen2vl if family == "qwen2-vl" else save_llava_next
    save(workdir / f"hf-{family}")
    ckpt = workdir / f"imported-{family}"
    run(["import-hf", f"hf-{family}", str(ckpt)], workdir)

    for size in [(37, 111), (160, 40)]:
        Image.new("RGB", size, (200, 40, 40)).save(workdir / f"odd_{size[0]}x{size[1]}.png")
        answer = run(["chat", "--checkpoint", str(ckpt), "--image", f"odd_{size[0]}x{size[1]}.png",
                      "What colour is the image?", "--max-new-tokens", "4"], workdir)
        assert answer.stdout.endswith("\n") and "Traceback" not in answer.stderr

    res = run(["eval", "run", "-b", "synth-media", "-m", f"vlmkit:{ckpt}", "--data", "data/synth/test.json",
               "-o", f"eval-{family}", "--no-progress", "--json"], workdir)
    score = json.loads(res.stdout)
    assert score["n_predicted"] == score["n_items"] == 6

    recipe = {"model": {"init_from": str(ckpt)},
              "train": {"output_dir": f"runs/{family}", "max_length": 2048,
                        "stages": {"lora": {"data": "data/synth/train.json", "trainable": ["llm"], "lr": 1e-3, "batch_size": 4,
                                            "max_steps": 2, "lora": {"parts": ["llm"], "r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}}}}}
    (workdir / f"lora-{family}.yaml").write_text(yaml.safe_dump(recipe))
    # The recipe's data path is relative to the recipe's folder: the working directory here.
    run(["train", f"lora-{family}.yaml"], workdir)
    trained = workdir / "runs" / family / "checkpoints" / "lora"
    assert (trained / "adapters.safetensors").is_file()
    answer = run(["chat", "--checkpoint", str(trained), "--image", "odd_37x111.png", "What colour?", "--max-new-tokens", "3"], workdir)
    assert "Traceback" not in answer.stderr


def test_imported_qwen2vl_serves_openai_chat_completions(tmp_path):
    """The OpenAI-compatible server on an imported Qwen2-VL answers what vlmkit's generate does."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from _serve_util import png_data_uri, running_server

    from vlmkit.data.formats import Message
    from vlmkit.generate import GenerationConfig, generate
    from vlmkit.hf.registry import import_hf
    from vlmkit.processing import build_chat_processor
    from vlmkit.processing.images import load_image
    from vlmkit.serve.app import ServerSettings, create_app
    from vlmkit.checkpoint import load_checkpoint

    model, _ = load_checkpoint(import_hf(save_qwen2vl(tmp_path / "hf"), tmp_path / "ckpt"))
    processor = build_chat_processor(model, 4096)
    settings = ServerSettings(model_name="qwen", api_key="k", max_tokens_limit=16, max_batch=4, max_wait_ms=10)
    uri = png_data_uri(size=(60, 36))
    import base64

    image = load_image(base64.b64decode(uri.split(",", 1)[1]))
    prompt = processor.encode_prompt([Message("user", "<image>\nWhat colour?")], [image])
    expected = model.tokenizer.decode(generate(model, [prompt], GenerationConfig(max_new_tokens=8))[0], skip_special_tokens=True)
    with running_server(create_app(model, processor, settings)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0, timeout=60)
        resp = client.chat.completions.create(model="qwen", max_tokens=8, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "What colour?"}]}])
    assert resp.choices[0].message.content == expected
