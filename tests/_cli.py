"""The `vlmkit` command run as a user runs it, for the tests that go through it from an empty
folder: a subprocess with the checkout's code (installed or not), offline, one thread, no
progress bars; a traceback is always a failure, and a non-zero exit one unless `ok=False`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def vlmkit(cwd: Path, *args: str, stdin: str | None = None, ok: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    script = Path(sys.executable).with_name("vlmkit")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "vlmkit.cli"]
    proc = subprocess.run([*command, *args], check=False, cwd=cwd, env=env, input=stdin, capture_output=True, text=True,
                          timeout=timeout)
    assert "Traceback" not in proc.stderr, proc.stderr
    if ok:
        assert proc.returncode == 0, f"vlmkit {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def train_video_recipe_and_chat(tmp_path: Path, recipe: str) -> tuple[Path, Path]:
    """Train the family recipe `recipes/families/<recipe>.yaml` for 3 steps on synthetic images and
    videos, then chat with the checkpoint about two odd-sized images and a video; returns the
    checkpoint and the video."""
    import yaml
    from PIL import Image

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "families" / f"{recipe}.yaml").read_text())
    spec["train"]["stages"]["instruct"] |= {"data": [{"path": "data/train.json", "weight": 3}, {"path": "data/video.json"}],
                                            "max_steps": 3, "batch_size": 4}
    spec["train"]["output_dir"] = "runs/base"
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(spec))
    vlmkit(tmp_path, "data", "synth-train", "data", "--n", "12", "--n-test", "2", "--n-video", "4")
    vlmkit(tmp_path, "train", "recipe.yaml")
    ckpt = tmp_path / "runs" / "base" / "checkpoints" / "instruct"
    for size in [(37, 111), (160, 40)]:
        Image.new("RGB", size, (200, 40, 40)).save(tmp_path / f"odd_{size[0]}x{size[1]}.png")
        answer = vlmkit(tmp_path, "chat", "--checkpoint", str(ckpt), "--image", f"odd_{size[0]}x{size[1]}.png", "What colour?",
                        "--max-new-tokens", "3")
        assert answer.stdout.endswith("\n")
    video = next((tmp_path / "data" / "videos").glob("*.mp4"))
    assert vlmkit(tmp_path, "chat", "--checkpoint", str(ckpt), "--video", str(video), "What happens?", "--max-new-tokens", "3").stdout
    return ckpt, video
