"""Every family folder declares itself once: its `SPEC` is found by the registries' discovery,
names its folder, and what it declares (processors, presets, Hugging Face model types) is what
the registries hold; `vlmkit families` lists them."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from typer.testing import CliRunner

import vlmkit.families
from vlmkit import presets
from vlmkit.cli import app
from vlmkit.families import family_specs
from vlmkit.hf.registry import SUPPORTED
from vlmkit.registry import IMAGE_PROCESSORS

FOLDERS = sorted(p.parent.name for p in Path(vlmkit.families.__file__).parent.glob("*/__init__.py"))


def test_every_folder_is_a_registered_family():
    specs = family_specs()
    assert [s.name for s in specs] == FOLDERS and len(FOLDERS) >= 16
    for spec in specs:
        assert importlib.import_module(f"vlmkit.families.{spec.name}").SPEC is spec


def test_what_a_family_declares_is_registered():
    listed = set(presets.names())
    for spec in family_specs():
        assert all(name in IMAGE_PROCESSORS for name in spec.image_processors), spec.name
        assert {entry["name"] for entry in spec.presets} <= listed, spec.name
        assert all(t in SUPPORTED for hf in spec.hf for t in hf.model_types), spec.name
        if spec.recipe:
            assert (Path(__file__).resolve().parents[2] / spec.recipe).is_file(), spec.recipe
    # Every preset belongs to exactly one family.
    owned = [entry["name"] for spec in family_specs() for entry in spec.presets]
    assert sorted(owned) == sorted(listed)


def test_families_command_lists_every_family():
    result = CliRunner().invoke(app, ["families", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["name"] for r in rows] == FOLDERS
    qwen = next(r for r in rows if r["name"] == "qwen2_vl")
    assert {"qwen2_vl", "qwen2_5_vl"} <= set(qwen["hf_model_types"]) and "qwen2-vl-7b" in qwen["presets"]
    text = CliRunner().invoke(app, ["families"]).output
    assert "import-hf: aya_vision" in text and "recipe: recipes/families/encoder-free.yaml" in text
