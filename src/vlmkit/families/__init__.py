"""Model families: one folder each, holding everything that is only that family's.

A family folder (`vlmkit/families/<name>/`) holds the family's image processing, the modules
only it uses, its Hugging Face import and export with the state-dict map, and its presets (real
shape and tiny variant). Its `__init__` imports those modules (each registers what it defines
in `vlmkit.registry`) and exports one declarative `SPEC`, registered in `FAMILIES`.

Nothing lists the folders: `vlmkit.registry.load_plugins` imports every subpackage of this one
on the first registry lookup. Adding a family is adding a folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmkit.hf.registry import HFFamily, register_family
from vlmkit.presets import register_presets
from vlmkit.registry import FAMILIES


@dataclass(frozen=True)
class FamilySpec:
    """What a family contributes, declared once.

    `name` is the folder's name; `title` what the docs and `vlmkit families` call it;
    `pattern` the architecture pattern of the lecture it follows (how images reach the LLM);
    `image_processors` the processor names it registers; `presets` its preset entries (the
    catalog's data format, `vlmkit.presets`); `hf` the transformers families it imports and
    exports; `recipe` the repository's tiny training recipe for it, where one exists."""

    name: str
    title: str
    pattern: str
    image_processors: tuple[str, ...] = ()
    presets: tuple[dict[str, Any], ...] = ()
    hf: tuple[HFFamily, ...] = ()
    recipe: str | None = None
    notes: tuple[str, ...] = field(default=())


def register_family_spec(spec: FamilySpec) -> FamilySpec:
    """Register the family and its presets; returns the spec, for `SPEC = register_family_spec(...)`."""
    FAMILIES.register(spec.name)(lambda: spec)
    register_presets(spec.presets)
    for hf_family in spec.hf:
        register_family(hf_family)
    return spec


def family_specs() -> list[FamilySpec]:
    """Every family, by folder name."""
    return [FAMILIES.build(name) for name in FAMILIES.names()]
