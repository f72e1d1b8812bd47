"""`vlmkit import-hf` on bad folders: each refusal is a clear error that names the cause (the
supported families, the missing or truncated file, the mis-shaped tensor), remote code is never
run, pickled weights are never loaded; and the CLI round trip for the new families."""

from __future__ import annotations

import json
import shutil
import sys
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


def _copy(good: Path, tmp_path: Path) -> Path:
    target = tmp_path / "hf"
    shutil.copytree(good, target)
    return target


def _edit_config(folder: Path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_unsupported_model_type_lists_the_supported_families(good, tmp_path):
    folder = _copy(good, tmp_path)
    # (A made-up family: real ones keep getting supported.)
    _edit_config(folder, lambda c: c.update(model_type="not_a_vlm", architectures=["NotAVlmForConditionalGeneration"]))
    with pytest.raises(ExportError, match="'not_a_vlm'.*not supported.*llava_next.*qwen2_vl"):
        import_hf(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_remote_code_models_are_refused_and_never_run(good, tmp_path):
    folder = _copy(good, tmp_path)
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    _edit_config(folder, lambda c: c.update(auto_map={"AutoModel": "modeling_evil.EvilModel"}))
    with pytest.raises(ExportError, match="trust_remote_code"):
        import_hf(folder, tmp_path / "out")
    assert not marker.exists()


def test_missing_weights_name_the_file(good, tmp_path):
    folder = _copy(good, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="no model.safetensors"):
        import_hf(folder, tmp_path / "out")
    # A sharded index whose shard is gone.
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ExportError, match="model-00002-of-00002.safetensors is missing"):
        import_hf(folder, tmp_path / "out")


def test_pickled_weights_are_refused(good, tmp_path):
    folder = _copy(good, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(ExportError, match=r"pytorch_model\.bin.*pickled"):
        import_hf(folder, tmp_path / "out")


def test_truncated_weights_name_the_file(good, tmp_path):
    folder = _copy(good, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match=r"model\.safetensors cannot be read, truncated"):
        import_hf(folder, tmp_path / "out")


def test_shape_disagreeing_with_config_names_the_tensor(good, tmp_path):
    folder = _copy(good, tmp_path)
    _edit_config(folder, lambda c: c["text_config"].update(intermediate_size=96))
    with pytest.raises(ExportError, match=r"tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape"):
        import_hf(folder, tmp_path / "out")


def test_missing_tensor_is_named(good, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(good, tmp_path)
    state = load_file(str(folder / "model.safetensors"))
    del state["visual.blocks.1.attn.qkv.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ExportError, match=r"visual\.blocks\.1\.attn\.qkv\.weight"):
        import_hf(folder, tmp_path / "out")


def test_cli_import_then_export_then_chat_ready(good, tmp_path):
    from typer.testing import CliRunner

    from vlmkit.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["import-hf", str(good), str(tmp_path / "ckpt")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export-hf", "--checkpoint", str(tmp_path / "ckpt"), str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    assert "qwen2_vl" in result.output
    diff = float(result.output.split("difference| ")[1].split(")")[0])
    assert diff < 1e-4
    bad = _copy(good, tmp_path / "bad")
    _edit_config(bad, lambda c: c.update(model_type="not_a_vlm"))
    result = runner.invoke(app, ["import-hf", str(bad), str(tmp_path / "nope")])
    assert result.exit_code == 1 and "error: " in result.output and "not supported" in result.output


def test_cli_export_check_for_idefics3(tmp_path):
    from typer.testing import CliRunner

    from idefics3_folder import save_idefics3
    from vlmkit.cli import app

    runner = CliRunner()
    folder = save_idefics3(tmp_path / "hf")
    assert runner.invoke(app, ["import-hf", str(folder), str(tmp_path / "ckpt")]).exit_code == 0
    result = runner.invoke(app, ["export-hf", "--checkpoint", str(tmp_path / "ckpt"), str(tmp_path / "back")])
    assert result.exit_code == 0, result.output
    assert "idefics3" in result.output and float(result.output.split("difference| ")[1].split(")")[0]) < 1e-4


def test_a_moved_import_still_loads_its_own_llm(good, tmp_path):
    """The checkpoint names its llm/ folder by absolute path; moved, it uses the copy inside."""
    import shutil as _shutil

    from vlmkit.config import load_config
    from vlmkit.checkpoint import load_checkpoint

    first = import_hf(good, tmp_path / "a" / "ckpt")
    moved = tmp_path / "b" / "ckpt"
    moved.parent.mkdir()
    _shutil.move(str(first), str(moved))
    model, config = load_checkpoint(moved)
    assert config.model.llm.path == str((moved / "llm").resolve())
    assert load_config({"model": {"init_from": str(moved)}}).model.llm.path == str((moved / "llm").resolve())


def test_hf_eval_backend_error_points_to_import_for_supported_families(good, tmp_path):
    from vlmkit.eval.backends import make_backend
    from vlmkit.eval.benchmarks.base import EvalInputError

    folder = _copy(good, tmp_path)
    (folder / "model.safetensors").unlink()  # transformers cannot load it (any cause gives the hint)
    with pytest.raises(EvalInputError, match=r"vlmkit import-hf .* then `-m vlmkit:OUT`"):
        make_backend(f"hf:{folder}")
