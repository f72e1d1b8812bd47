"""Hostile Hugging Face folders given to `import-hf`: a weights index pointing outside the
folder, pickled LLaVA weights, configs claiming models far larger than their weights, absurd
processor values, runaway chat templates, integer or NaN weights, and malformed JSON files.
Each is refused (or, for NaN, warned about) with an error naming the file and the field; the
cases that ran away with memory or time on the old code run in a child process bounded in both."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from vlmkit.hf.folder import ExportError
from vlmkit.hf.registry import import_hf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qwen2_vl_folder import save_qwen2vl  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_qwen2vl(tmp_path_factory.mktemp("good") / "hf")


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A LLaVA-1.5 folder (vlmkit's tiny MLP model exported)."""
    from _tiny import tiny_model

    from vlmkit.families.llava.hf import export_llava

    return export_llava(tiny_model("mlp"), tmp_path_factory.mktemp("llava") / "hf")


def _copy(src: Path, tmp_path: Path) -> Path:
    target = tmp_path / "hf"
    shutil.copytree(src, target, symlinks=True)
    return target


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _refused(folder: Path, out: Path, pattern: str) -> ExportError:
    with pytest.raises(ExportError, match=pattern) as err:
        import_hf(folder, out)
    assert not out.exists()
    return err.value


# ---- 1. the weights index stays inside the folder ------------------------------------------------


def _indexed(folder: Path, target: str) -> None:
    """Replace model.safetensors by an index sending every tensor to `target`."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: target for k in keys}}))


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "etc-passwd", "symlink-out"])
def test_weight_map_entries_outside_the_folder_are_refused(good, tmp_path, kind):
    folder = _copy(good, tmp_path)
    # Valid weights outside the folder: the old code imported them.
    outside = tmp_path / "other.safetensors"
    shutil.move(folder / "model.safetensors", outside)
    shutil.copy(outside, folder / "model.safetensors")
    target = {"absolute": str(outside), "dotdot": "../other.safetensors", "etc-passwd": "../../etc/passwd",
              "symlink-out": "link.safetensors"}[kind]
    if kind == "symlink-out":
        (folder / "link.safetensors").symlink_to(outside)
    _indexed(folder, target)
    (folder / "model.safetensors").unlink()
    message = str(_refused(folder, tmp_path / "out", r"model\.safetensors\.index\.json: weight_map entry .*outside"))
    assert target in message


def test_model_safetensors_linked_outside_is_refused(good, tmp_path):
    folder = _copy(good, tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(folder / "model.safetensors", outside)
    (folder / "model.safetensors").symlink_to(outside)
    _refused(folder, tmp_path / "out", r"model\.safetensors: resolves to .*outside")


def test_hugging_face_cache_snapshot_links_are_accepted(good, tmp_path):
    """A hub cache snapshot links its files into the repository's blobs/: that is not outside."""
    repo = tmp_path / "models--tiny--qwen"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(good.iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(f, blob)
        (snapshot / f.name).symlink_to(Path("../../blobs") / blob.name)
    assert import_hf(snapshot, tmp_path / "out").is_dir()


# ---- 2. LLaVA's pickled weights are never loaded ----------------------------------------------


def test_llava_pickled_weights_are_refused(llava, tmp_path):
    from safetensors.torch import load_file

    folder = _copy(llava, tmp_path)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    message = str(_refused(folder, tmp_path / "out", r"pytorch_model\.bin.*pickled"))
    assert str(folder) in message


def test_llava_corrupt_safetensors_names_the_file(llava, tmp_path):
    folder = _copy(llava, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    _refused(folder, tmp_path / "out", r"model\.safetensors cannot be read, truncated")


# ---- 3 and 4. configs far larger than their weights, runaway templates: bounded children ---------

_CHILD = textwrap.dedent("""
    import json, sys, time
    from vlmkit.hf.folder import ExportError
    from vlmkit.hf.registry import import_hf
    start = time.monotonic()
    try:
        import_hf(sys.argv[1], sys.argv[2])
        result = "imported"
    except ExportError as e:
        result = "ExportError: " + str(e)
    except BaseException as e:
        result = type(e).__name__ + ": " + str(e)
    print(json.dumps({"result": result, "seconds": time.monotonic() - start}))
""")


def _import_in_child(folder: Path, out: Path, timeout: float = 90, memory_gb: float = 6) -> dict:
    """import_hf in a child process with an address-space limit and a time limit."""
    limit = int(memory_gb * 2**30)

    def bound():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"), os.environ.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, str(folder), str(out)], capture_output=True, text=True,
                              timeout=timeout, env=env, preexec_fn=bound)
    except subprocess.TimeoutExpired:
        pytest.fail(f"import-hf ran past {timeout} s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, f"the child died (rc {done.returncode}): {done.stderr[-2000:]}"
    return json.loads(lines[-1])


@pytest.mark.parametrize("field,value,named", [
    ("hidden_size", 8192, "text_config.hidden_size=8192, "),           # 3 GB peak on the old code
    ("num_hidden_layers", 10**6, "text_config.num_hidden_layers=1000000, "),  # minutes on the old code
    ("hidden_size", 10**9, "text_config.hidden_size=1000000000, "),    # 176 GB allocation on the old code
    # Passes the parameter floor; the language model's shapes are compared on the meta device.
    ("vocab_size", 10**9, "tensor model.embed_tokens.weight has shape (264, 64), but config.json implies (1000000000, 64)"),
])
def test_config_claiming_a_larger_model_than_its_weights_is_refused_before_building(good, tmp_path, field, value, named):
    folder = _copy(good, tmp_path)
    # (layer_types would otherwise have to list every layer; a folder may leave it out.)
    _edit_json(folder / "config.json", lambda c: (c["text_config"].update({field: value}), c["text_config"].pop("layer_types", None)))
    result = _import_in_child(folder, tmp_path / "out", memory_gb=6)
    assert result["result"].startswith("ExportError: "), result
    assert "config.json" in result["result"] and named in result["result"]
    assert result["seconds"] < 30
    assert not (tmp_path / "out").exists()


def test_runaway_chat_template_is_stopped_and_named(good, tmp_path):
    folder = _copy(good, tmp_path)
    (folder / "chat_template.jinja").write_text(
        "{% for a in range(100000) %}{% for b in range(100000) %}{{ '' }}{% endfor %}{% endfor %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    result = _import_in_child(folder, tmp_path / "out", timeout=90)
    assert result["result"].startswith("ExportError: "), result
    assert "chat_template.jinja" in result["result"] and "did not render" in result["result"]
    assert result["seconds"] < 30


def test_absurd_max_pixels_names_field_and_file(good, tmp_path):
    folder = _copy(good, tmp_path)
    _edit_json(folder / "preprocessor_config.json", lambda c: c["size"].update(longest_edge=10**13))
    _refused(folder, tmp_path / "out", r"preprocessor_config\.json: size\.longest_edge must be an integer from 0 to")
    _edit_json(folder / "preprocessor_config.json", lambda c: (c["size"].update(longest_edge=16384), c.update(max_pixels=10**13)))
    _refused(folder, tmp_path / "out", r"preprocessor_config\.json: max_pixels must be an integer")


# ---- 5. integer and non-finite weights -------------------------------------------------------------


def _rewrite_weights(folder: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


def test_integer_weights_are_refused_naming_file_and_tensor(good, tmp_path):
    folder = _copy(good, tmp_path)
    name = "visual.blocks.0.attn.qkv.weight"
    _rewrite_weights(folder, lambda s: s.update({name: s[name].view(torch.int32)}))
    _refused(folder, tmp_path / "out", rf"model\.safetensors: tensor {name} is stored as I32")


def test_nan_weights_import_with_a_warning_naming_them(good, tmp_path):
    folder = _copy(good, tmp_path)
    name = "visual.blocks.1.mlp.fc1.weight"
    _rewrite_weights(folder, lambda s: s[name].fill_(float("nan")))
    with pytest.warns(UserWarning, match=rf"model\.safetensors: 1 tensors hold NaN or infinite values, e\.g\. \['{name}'\]"):
        assert import_hf(folder, tmp_path / "out").is_dir()


def test_finite_weights_import_without_warnings(good, tmp_path):
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*non-finite|.*NaN or infinite")
        assert import_hf(good, tmp_path / "out").is_dir()


# ---- 6. malformed files name the file and the field ------------------------------------------------


def _deep(path: Path) -> None:
    path.write_text('{"model_type": "qwen2_vl", "x": ' + "[" * 100_000 + "]" * 100_000 + "}")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _weight_index(folder: Path, value) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(value))


MALFORMED = {
    "config-list": (lambda f: (f / "config.json").write_text("[1, 2]"), r"config\.json must hold a JSON object, not a list"),
    "config-not-utf8": (lambda f: (f / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}'), r"config\.json: not UTF-8"),
    "config-deep": (lambda f: _deep(f / "config.json"), r"config\.json: JSON nested too deeply"),
    "config-field-type": (lambda f: _edit_json(f / "config.json", lambda c: c.update(vision_config=[1])),
                          r"config\.json: transformers cannot build the config"),
    "index-list": (lambda f: _weight_index(f, ["model.safetensors"]), r"model\.safetensors\.index\.json must hold a JSON object"),
    "weight-map-list": (lambda f: _weight_index(f, {"weight_map": ["model.safetensors"]}),
                        r"model\.safetensors\.index\.json: weight_map must be an object"),
    "weight-map-value": (lambda f: _weight_index(f, {"weight_map": {"lm_head.weight": 7}}),
                         r"model\.safetensors\.index\.json: weight_map must be an object"),
    "tokenizer-truncated": (lambda f: _truncate(f / "tokenizer.json"), r"tokenizer\.json: not valid JSON"),
    "tokenizer-config-list": (lambda f: (f / "tokenizer_config.json").write_text("[]"), r"tokenizer_config\.json must hold a JSON object"),
    "preprocessor-list": (lambda f: (f / "preprocessor_config.json").write_text("[]"), r"preprocessor_config\.json must hold a JSON object"),
    "processor-list": (lambda f: (f / "processor_config.json").write_text('["x"]'), r"processor_config\.json must hold a JSON object"),
    "processor-nested-list": (lambda f: (f / "processor_config.json").write_text('{"image_processor": [1]}'),
                              r"processor_config\.json: image_processor must be an object"),
    "size-string": (lambda f: _edit_json(f / "preprocessor_config.json", lambda c: c.update(size="big")),
                    r"preprocessor_config\.json: size must be an integer"),
    "mean-string": (lambda f: _edit_json(f / "preprocessor_config.json", lambda c: c.update(image_mean="grey")),
                    r"preprocessor_config\.json: image_mean must be a number or a list of numbers"),
    "patch-string": (lambda f: _edit_json(f / "preprocessor_config.json", lambda c: c.update(patch_size="4")),
                     r"preprocessor_config\.json: patch_size must be an integer"),
    "image-token-oov": (lambda f: (f / "processor_config.json").write_text('{"image_token": "<no_such_token>"}'),
                        r"image token '<no_such_token>' is not in the tokenizer's vocabulary"),
    "chat-template-json": (lambda f: (f / "chat_template.json").write_text('{"chat_template": 5}'),
                           r"chat_template\.json: chat_template must be a string"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_files_name_the_file_and_field(good, tmp_path, kind):
    folder = _copy(good, tmp_path)
    if kind == "chat-template-json":
        (folder / "chat_template.jinja").unlink()
    break_it, pattern = MALFORMED[kind]
    break_it(folder)
    _refused(folder, tmp_path / "out", pattern)


@pytest.mark.parametrize("kind,named", [("config-list", "config.json"), ("weight-map-list", "model.safetensors.index.json")])
def test_cli_names_the_file_without_a_traceback(good, tmp_path, kind, named):
    from typer.testing import CliRunner

    from vlmkit.cli import app

    folder = _copy(good, tmp_path)
    MALFORMED[kind][0](folder)
    result = CliRunner().invoke(app, ["import-hf", str(folder), str(tmp_path / "out")])
    assert result.exit_code != 0
    assert named in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "out").exists()
