"""`vlmkit import-hf SRC OUT` and `vlmkit export-hf --checkpoint CK OUT` never delete a folder they
did not write: a non-empty OUT that is not an earlier output of the same command is refused unless
`--overwrite` is given; OUT may never be, or contain, the source (or the current folder); the new
output is swapped in atomically, and staging folders of killed runs are removed by the next run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from vlmkit.cli import app
from vlmkit.hf.registry import import_hf
from vlmkit.hf.output_folder import MARKER, OutputFolderError, claim_output, remove_stale_staging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qwen2_vl_folder import save_qwen2vl  # noqa: E402

torch.set_num_threads(1)
TESTS = Path(__file__).resolve().parents[1]
SRC = TESTS.parent / "src"


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_qwen2vl(tmp_path_factory.mktemp("hf") / "hf")


@pytest.fixture(scope="module")
def imported(hf_folder, tmp_path_factory):
    return import_hf(hf_folder, tmp_path_factory.mktemp("ck") / "ck")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_refused(result, *fragments):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_import_refuses_an_unrelated_folder_and_keeps_it(hf_folder, tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    (out / "thesis.txt").write_text("four years")
    assert_refused(run("import-hf", hf_folder, out), str(out), "--overwrite")
    assert (out / "thesis.txt").read_text() == "four years"
    assert not any(p.name.startswith(".work.") for p in tmp_path.iterdir())  # nothing staged for a refusal


def test_import_overwrite_replaces_an_unrelated_folder(hf_folder, tmp_path):
    out = tmp_path / "work"
    out.mkdir()
    (out / "old.txt").write_text("x")
    result = run("import-hf", hf_folder, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert json.loads((out / MARKER).read_text())["command"] == "import-hf"
    assert [p.name for p in tmp_path.iterdir()] == ["work"]  # the old content is gone, no staging left


@pytest.mark.parametrize("where", ["source", "source parent", "cwd"])
def test_import_never_writes_over_the_source_or_the_current_folder(hf_folder, tmp_path, monkeypatch, where):
    src = tmp_path / "models" / "hf"
    shutil.copytree(hf_folder, src)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    monkeypatch.chdir(work)
    out = {"source": src, "source parent": src.parent, "cwd": Path(".")}[where]
    # Even --overwrite cannot make the source or the current folder an output.
    result = run("import-hf", src, out, "--overwrite")
    assert_refused(result, "source" if where != "cwd" else "current folder")
    assert tree(tmp_path) == before


def test_an_earlier_import_is_replaced_and_an_empty_folder_used(hf_folder, tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    assert run("import-hf", hf_folder, out).exit_code == 0  # empty: fine
    first = (out / "model.safetensors").stat().st_ino
    result = run("import-hf", hf_folder, out)  # our own marker: replaced without --overwrite
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").stat().st_ino != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_an_import_of_an_earlier_version_is_recognised(hf_folder, imported, tmp_path):
    out = tmp_path / "ck"
    shutil.copytree(imported, out)
    (out / MARKER).unlink()  # written before the marker existed: meta.json names the source
    assert run("import-hf", hf_folder, out).exit_code == 0


def test_an_export_is_not_an_import(hf_folder, imported, tmp_path):
    back = tmp_path / "back"
    assert run("export-hf", "--checkpoint", imported, back, "--no-check").exit_code == 0
    assert_refused(run("import-hf", hf_folder, back), "not written by `vlmkit import-hf`")
    assert (back / "config.json").is_file()


def test_export_onto_its_own_checkpoint_is_refused(imported, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(imported, ck)
    before = tree(ck)
    for out in (ck, tmp_path):
        assert_refused(run("export-hf", "--checkpoint", ck, out, "--overwrite"), "source")
    assert tree(ck) == before


def test_export_refuses_an_unrelated_folder_then_replaces_its_own(imported, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    assert_refused(run("export-hf", "--checkpoint", imported, out), "not written by `vlmkit export-hf`")
    assert (out / "notes.md").read_text() == "mine"
    assert run("export-hf", "--checkpoint", imported, out, "--no-check", "--overwrite").exit_code == 0
    assert not (out / "notes.md").exists()
    again = run("export-hf", "--checkpoint", imported, out, "--no-check")
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_a_file_is_never_an_output_folder(hf_folder, tmp_path):
    out = tmp_path / "model.bin"
    out.write_bytes(b"data")
    assert_refused(run("import-hf", hf_folder, out, "--overwrite"), "is not a folder")
    assert out.read_bytes() == b"data"


def test_a_folder_that_appears_while_writing_is_not_replaced(hf_folder, tmp_path, monkeypatch):
    """--overwrite approves the folder it saw; one put in its place meanwhile is refused at the swap."""
    from vlmkit.families.qwen2_vl import hf as qwen2_vl  # the folder's family: it stages the import

    out = tmp_path / "ck"
    real = qwen2_vl.staging_folder

    def staging_then_someone_writes(target):
        (out / "report.txt").parent.mkdir(exist_ok=True)
        (out / "report.txt").write_text("written meanwhile")
        return real(target)

    monkeypatch.setattr(qwen2_vl, "staging_folder", staging_then_someone_writes)
    with pytest.raises(OutputFolderError, match="changed while the output was written"):
        import_hf(hf_folder, out)
    assert (out / "report.txt").read_text() == "written meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # the staged import was removed


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_staging_of_killed_runs_is_removed(tmp_path):
    out = tmp_path / "ck"
    dead = tmp_path / f".ck.vlmkit-staging-{_dead_pid()}-abc123"
    live = tmp_path / f".ck.vlmkit-staging-{os.getpid()}-def456"
    legacy = tmp_path / ".ck.import-a1b2c3d4"
    other = tmp_path / ".ck.mine"  # not a name vlmkit writes
    for folder in (dead, live, legacy, other):
        (folder / "llm").mkdir(parents=True)
    claim_output(out, command="import-hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name])
    assert remove_stale_staging(out) == []


_KILLED_RUN = textwrap.dedent("""
    import os, shutil, signal, sys
    sys.path.insert(0, {src!r})
    from vlmkit.hf import output_folder  # noqa: F401
    from vlmkit.hf.registry import export_hf, import_hf
    from vlmkit.checkpoint import load_checkpoint

    real_rmtree = shutil.rmtree
    def die_at_delete(path, *a, **k):
        # SIGKILL at the step that removes the previous output (now in the staging folder).
        if ".vlmkit-staging-" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rmtree(path, *a, **k)
    shutil.rmtree = die_at_delete
    if sys.argv[1] == "import":
        import_hf(sys.argv[2], sys.argv[3])
    else:
        model, _ = load_checkpoint(sys.argv[2])
        export_hf(model, sys.argv[3])
""")


@pytest.mark.parametrize("command", ["import", "export"])
def test_sigkill_while_removing_the_previous_output_leaves_a_complete_one(hf_folder, imported, tmp_path, command):
    from transformers import AutoConfig

    out = tmp_path / "out"
    source = hf_folder if command == "import" else imported
    if command == "import":
        import_hf(hf_folder, out)
    else:
        assert run("export-hf", "--checkpoint", imported, out, "--no-check").exit_code == 0
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_RUN.format(src=str(SRC)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), command, str(source), str(out)], env=env, timeout=300,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".out.vlmkit-staging-")]
    assert leftovers, "the kill should have left the previous output in a staging folder"
    # OUT is the complete new output: every file of the old one, the marker, and it loads.
    assert json.loads((out / MARKER).read_text())["command"] == f"{command}-hf"
    if command == "import":
        from vlmkit.checkpoint import load_checkpoint

        load_checkpoint(out)
    else:
        AutoConfig.from_pretrained(out, local_files_only=True)
        assert (out / "tokenizer_config.json").is_file() and (out / "processor_config.json").is_file()
    claim_output(out, command=f"{command}-hf")  # the next run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["killed.py", "out"]


def test_sigkill_mid_import_leaves_the_previous_import_and_the_next_run_cleans_up(hf_folder, tmp_path):
    out = tmp_path / "ck"
    import_hf(hf_folder, out)
    before = tree(out)
    code = f"import sys; sys.path.insert(0, {str(SRC)!r}); from vlmkit.hf.registry import import_hf; import_hf({str(hf_folder)!r}, {str(out)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(".ck.vlmkit-staging-") for p in tmp_path.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "the import never staged"
        time.sleep(0.01)
    proc.kill()
    proc.wait(timeout=30)
    assert tree(out) == before
    assert run("import-hf", hf_folder, out).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
