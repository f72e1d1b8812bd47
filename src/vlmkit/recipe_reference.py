"""The recipe reference, generated from the pydantic models in `config.py` (every field, its type,
default and docstring) and the registries (which names each `name` field accepts), so it cannot
drift from the code. `vlmkit recipe --schema` prints it; `docs/recipes.md` is a copy that a test
keeps current."""

from __future__ import annotations

import types
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from vlmkit.config import Config
from vlmkit.registry import CONNECTORS, IMAGE_PROCESSORS, LANGUAGE_MODELS, VISION_TOWERS

HEADER = """# Recipe reference

A recipe is a YAML file with two sections, `model` and `train`. Every key below can also be
given on the command line as `KEY=VALUE` (`vlmkit train my.yaml train.stages.sft.lr=1e-4`);
a misspelt key is an error that suggests the closest real one; so is a key given twice in one
mapping. Every number must be finite and within the bounds below; YAML aliases may repeat at
most 10000 nodes in all. `vlmkit recipe --template`
writes a commented recipe for training on your own LLaVA-format data.

This page is generated from the code (`vlmkit recipe --schema > docs/recipes.md`); a test
fails when it is out of date.
"""


def _registered() -> dict[str, list[str]]:
    """Names each registry accepts, keyed by the dotted field that takes them."""
    import vlmkit.model.connectors  # noqa: F401  (importing registers the builders)
    import vlmkit.model.language  # noqa: F401
    import vlmkit.model.vision  # noqa: F401
    return {"model.vision.name": VISION_TOWERS.names(), "model.connector.name": CONNECTORS.names(),
            "model.llm.name": LANGUAGE_MODELS.names(), "model.processor.name": IMAGE_PROCESSORS.names()}


def _type(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        text = " or ".join(_type(a) for a in inner)
        return text + " or null" if len(inner) < len(args) else text
    if origin is list:
        if isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return "list of sections (`[]` below)"
        return f"list of {_type(args[0])}"
    if origin is tuple:
        return f"{len(args)} {_type(args[0])}s"
    if origin is dict:
        value = args[1] if len(args) == 2 else None
        if isinstance(value, type) and issubclass(value, BaseModel):
            return "mapping of name to section (`NAME` below)"
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return {str: "string", int: "integer", float: "number", bool: "boolean"}.get(annotation, str(annotation))


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    value = field.default_factory() if field.default is PydanticUndefined else field.default
    if isinstance(value, BaseModel):
        return "(below)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in value) + "]"
    return str(value) if value != {} else "{}"


def _bounds(field) -> str:
    words = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    found = []
    for m in field.metadata:
        for attr, sign in words.items():
            if getattr(m, attr, None) is not None:
                found.append(f"{sign} {getattr(m, attr)}")
    return f" ({', '.join(found)})" if found else ""


def _sections(model: type[BaseModel], prefix: str):
    """(dotted section, its model) for this model and every model under it, depth first."""
    yield prefix, model
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _sections(annotation, f"{prefix}.{name}" if prefix else name)
        elif get_origin(annotation) is dict:
            value = get_args(annotation)[1]
            if isinstance(value, type) and issubclass(value, BaseModel):
                yield from _sections(value, f"{prefix}.{name}.NAME")
        else:
            # A list of sections, alone or as one branch of a union (a stage's `data` mixture).
            for arg in (get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)):
                item = get_args(arg)[0] if get_origin(arg) is list and get_args(arg) else None
                if isinstance(item, type) and issubclass(item, BaseModel):
                    yield from _sections(item, f"{prefix}.{name}[]")


def reference_markdown() -> str:
    names = _registered()
    out = [HEADER]
    for section, model in _sections(Config, ""):
        if not section:
            continue
        out.append(f"## `{section}`\n")
        if model.__doc__:
            out.append(" ".join(model.__doc__.split()) + "\n")
        out.append("| key | type | default | what it does |\n|---|---|---|---|")
        for name, field in model.model_fields.items():
            key = f"{section}.{name}"
            what = " ".join((field.description or "").split())
            if key in names:
                what += " Registered: " + ", ".join(f"`{n}`" for n in names[key]) + "."
            what = what.replace("|", "\\|")  # a bar would end the table cell
            default = _default(field)
            if not default.startswith(("**", "(")):
                default = f"`{default}`"
            out.append(f"| `{key}` | {_type(field.annotation)}{_bounds(field)} | {default} | {what} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def template_path() -> Path:
    return Path(str(resources.files("vlmkit") / "recipes" / "llava_data.yaml"))
