"""The Hugging Face families vlmkit imports and exports, and the entry points over them.

Each family folder (`vlmkit.families.<family>`) declares its `HFFamily`s in its `FamilySpec`,
which registers them here; the folders are found by the registries' discovery
(`vlmkit.registry.load_plugins`, nothing lists them). Families are asked in order of their
declared `specificity`, so a family that refines another (Pixtral over LLaVA-1.5, LLaVA-OneVision over LLaVA-NeXT) is asked
first. `import_hf(folder, out)` reads `config.json` (never running remote code) and hands the
folder to its family; `export_hf(model, out)` writes the model in its family's format;
`verify_hf_export` compares the logits of transformers' reload with vlmkit's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from vlmkit.core.types import Message
from vlmkit.hf.folder import ExportError, vetted_config
from vlmkit.hf.output_folder import claim_output
from vlmkit.hf.writing import EXPORT_COMMAND, IMPORT_COMMAND, model_sources
from vlmkit.paths import offline
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch
from vlmkit.registry import load_plugins


@dataclass(frozen=True)
class HFFamily:
    """One transformers family vlmkit imports and exports.

    `owns(model)` tells whether a vlmkit model exports to this family (asked most specific
    first); `reference(model, prompt, ids)` returns the transformers class
    and the keyword inputs (besides `input_ids`) that feed it the prompt's images, for
    `verify_hf_export`."""

    model_types: tuple[str, ...]
    description: str
    importer: Callable[[Path, Path], Path]
    exporter: Callable[[Any, Path], Path]
    owns: Callable[[Any], bool]
    reference: Callable[[Any, Any, torch.Tensor], tuple[type, dict]] | None = None
    accepts: Callable[[dict], bool] = lambda cfg: True
    # Asked before families of lower specificity: one that refines another's model_type or
    # models (Pixtral over LLaVA-1.5, LLaVA-OneVision over LLaVA-NeXT) declares a higher one.
    specificity: int = 0
    # The model_type a model exports as, where the family has several (Qwen2-VL / Qwen2.5-VL).
    model_type_of: Callable[[Any], str] | None = None
    # The family's own export check, where `reference` cannot express it (LLaVA-1.5).
    verify: Callable[[Any, Path], float] | None = None


FAMILIES: list[HFFamily] = []


def register_family(family: HFFamily) -> HFFamily:
    FAMILIES.insert(0, family)  # of equal specificity, the later registration is asked first
    FAMILIES.sort(key=lambda f: -f.specificity)
    return family


def _families() -> list[HFFamily]:
    """Every family, most specific first."""
    load_plugins()
    return FAMILIES


def family_for(model_type: str, cfg: dict | None = None) -> HFFamily | None:
    return next((f for f in _families() if model_type in f.model_types and (cfg is None or f.accepts(cfg))), None)


class _Supported(dict):
    """model_type -> description of every registered family (filled on first use, so family
    modules can import this one)."""

    def _fill(self):
        for f in reversed(_families()):
            for t in f.model_types:
                dict.setdefault(self, t, f.description)

    def __contains__(self, key):
        self._fill()
        return dict.__contains__(self, key)

    def items(self):
        self._fill()
        return dict.items(self)

    def __iter__(self):
        self._fill()
        return dict.__iter__(self)


SUPPORTED = _Supported()


def supported_families() -> str:
    return ", ".join(f"{k} [{v}]" for k, v in SUPPORTED.items())


def read_hf_config(folder: Path) -> dict:
    """`config.json` as JSON, refused before anything is built when it names remote code or an
    unsupported family."""
    path = folder / "config.json"
    cfg = vetted_config(folder, supported_families)
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str) or model_type not in SUPPORTED:
        raise ExportError(f"{path}: model_type {model_type!r} (architectures {cfg.get('architectures')}) is not supported; "
                          "vlmkit imports: " + supported_families())
    return cfg


def import_hf(folder: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Any supported Hugging Face folder -> a vlmkit checkpoint at `out`. An existing `out` is
    replaced only when it is empty or an earlier import, or when `overwrite` is set; never when it
    is or contains `folder` (`vlmkit.hf.output_folder`)."""
    offline()
    folder = Path(folder)
    out = claim_output(out, command=IMPORT_COMMAND, sources=(folder,), overwrite=overwrite)
    cfg = read_hf_config(folder)
    return family_for(cfg["model_type"], cfg).importer(folder, out)


def _owner(model) -> HFFamily:
    return next(f for f in _families() if f.owns(model))


def family_of(model) -> str:
    """Which transformers family a vlmkit model exports to."""
    family = _owner(model)
    return family.model_type_of(model) if family.model_type_of else family.model_types[0]


def export_hf(model, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write `model` in its family's transformers format. An existing `out` is replaced only when
    it is empty or an earlier export, or when `overwrite` is set; never when it holds the model's
    own LLM folder (an imported checkpoint)."""
    out = claim_output(out, command=EXPORT_COMMAND, sources=model_sources(model), overwrite=overwrite)
    return _owner(model).exporter(model, out)


@torch.no_grad()
def verify_hf_export(model, folder: str | Path) -> float:
    """Largest |logit difference| between vlmkit and transformers' reload of the export, on one
    image+text prompt of the family's own layout."""
    from PIL import Image

    family = _owner(model)
    if family.verify is not None:
        return family.verify(model, folder)
    offline()
    g = torch.Generator().manual_seed(0)
    size = model.config.processor.image_size
    image = Image.fromarray((torch.rand(size, size * 3 // 2, 3, generator=g) * 255).byte().numpy())
    prompt = build_chat_processor(model, 1 << 20).encode_prompt([Message("user", "<image>\nDescribe the image.")], [image])
    ids = prompt.input_ids[None]
    cls, kwargs = family.reference(model, prompt, ids)
    extra = {"position_ids": prompt.position_ids[:, None].to(model.device)} if prompt.position_ids is not None else {}
    ours = model(ids.to(model.device), VisualBatch(prompt.images), **extra)
    ref = cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    theirs = ref(input_ids=ids, **kwargs).logits.float()
    ours = ours.logits.float().cpu()
    return float((ours - theirs[..., : ours.shape[-1]]).abs().max())


def processor_is(name: str) -> Callable[[Any], bool]:
    return lambda model: model.config.processor.name == name
