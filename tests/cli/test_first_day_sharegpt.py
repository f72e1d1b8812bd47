"""A LLaMA-Factory user's first day, through the `vlmkit` command in an empty folder: their
sharegpt file (`conversations` + `images`, real digit images from scikit-learn) is checked by
`recipe --check`, which names an image that is not there, then passes once it is, and a tiny
recipe (copied from recipes/families/fixed.yaml) trains on it for a few steps.

Every step runs the real command in a subprocess; no step may print a traceback."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import yaml
from _cli import vlmkit
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]




def write_sharegpt(folder: Path, n: int = 32) -> list[dict]:
    """n of scikit-learn's 8x8 digits as 32 px PNGs, and LLaMA-Factory sharegpt records asking which digit."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    (folder / "digits").mkdir(parents=True)
    records = []
    for i in range(n):
        pixels = (255 - digits.images[i] * 255 / 16).astype(np.uint8)  # 0..16 ink -> dark on white
        Image.fromarray(pixels).resize((32, 32), Image.NEAREST).convert("RGB").save(folder / "digits" / f"{i}.png")
        records.append({"conversations": [{"from": "human", "value": "<image>Which digit is this?"},
                                          {"from": "gpt", "value": WORDS[digits.target[i]]}],
                        "system": "Answer with one word.", "images": [f"digits/{i}.png"]})
    (folder / "digits.json").write_text(json.dumps(records, indent=1))
    return records


def test_first_day_with_sharegpt_records(tmp_path):
    home = tmp_path / "my-project"
    home.mkdir()
    records = write_sharegpt(home)
    tree = yaml.safe_load((ROOT / "recipes" / "families" / "fixed.yaml").read_text())
    (stage,) = tree["train"]["stages"].values()
    tree["train"]["stages"] = {"sft": {**stage, "data": "digits.json", "batch_size": 8, "max_steps": 6}}
    tree["train"]["output_dir"] = "runs/digits"
    (home / "recipe.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))

    # A typo in one image path is caught before any model loads: record, field, where, absolute path.
    records[5]["images"] = ["digits/5.jpg"]
    (home / "digits.json").write_text(json.dumps(records, indent=1))
    refused = vlmkit(home, "recipe", "--check", "recipe.yaml", ok=False)
    assert refused.returncode == 2
    assert f"record '#5': {home / 'digits' / '5.jpg'} (field 'images[0]') not found (item 6 of digits.json)" in refused.stderr

    records[5]["images"] = ["digits/5.png"]
    (home / "digits.json").write_text(json.dumps(records, indent=1))
    check = vlmkit(home, "recipe", "--check", "recipe.yaml")
    assert f"stage sft: 32 records in {home / 'digits.json'}" in check.stdout
    assert "recipe and data are valid" in check.stdout

    run = vlmkit(home, "train", "recipe.yaml")
    line = next(x for x in run.stdout.splitlines() if x.startswith("stage sft: 6 steps"))
    loss = float(line.split("final loss ")[1].split(",")[0])
    assert math.isfinite(loss) and loss > 0
    assert (home / "runs" / "digits" / "checkpoints" / "sft").is_dir()
