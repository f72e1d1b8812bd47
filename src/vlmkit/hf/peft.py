"""LoRA adapters exported as a PEFT adapter folder next to the base model.

`export_hf_peft(model, out)` takes a vlmkit model that carries its LoRA adapters unmerged
(`load_checkpoint(..., merge=False)`) and writes

* `out/`: the base weights (adapters not merged) in the family's transformers format, exactly
  what `export_hf` writes for a model without adapters;
* `out/adapter/`: a PEFT LoRA folder (`adapter_config.json`, `adapter_model.safetensors`) for
  that transformers model, written by peft itself from a `PeftModel` holding vlmkit's adapter
  matrices, so `peft.PeftModel.from_pretrained(transformers_model, out / "adapter")` loads it.

Which transformers module an adapted vlmkit layer is comes from the names and the weights: the
layer's module path inside its part must end the transformers module's path, and the two base
weights must be equal, for every adapted layer of the part under one prefix rule; anything else
is an error naming the layer. The adapter's `target_modules` are those full module names, so peft
adapts exactly these layers (a vision tower's `q_proj` is not caught by the LLM's `q_proj`).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch
from torch import nn

from vlmkit.data.formats import Message
from vlmkit.hf.folder import ExportError
from vlmkit.hf.output_folder import claim_output, publish, staging_folder
from vlmkit.hf.registry import export_hf, family_for, family_of
from vlmkit.hf.writing import model_sources
from vlmkit.model.lora import ADAPTER_NAME, lora_layers
from vlmkit.processing import build_chat_processor
from vlmkit.processing.base import VisualBatch

ADAPTER_DIR = "adapter"


@contextlib.contextmanager
def adapters_removed(model):
    """The model with each LoRA layer swapped for its base layer (nothing merged); put back after."""
    swapped, spec = [], model.lora_spec
    try:
        for part in spec["parts"]:
            module = model.parts()[part]
            for name, layer in lora_layers(module):
                parent_name, _, child = name.rpartition(".")
                parent = module.get_submodule(parent_name) if parent_name else module
                setattr(parent, child, layer.get_base_layer())
                swapped.append((parent, child, layer))
        model.lora_spec = None
        yield model
    finally:
        for parent, child, layer in swapped:
            setattr(parent, child, layer)
        model.lora_spec = spec


def _adapted_layers(model) -> dict[str, list[tuple[str, nn.Module]]]:
    return {part: lora_layers(model.parts()[part]) for part in model.lora_spec["parts"]}


def _base_weight(layer) -> torch.Tensor:
    return layer.get_base_layer().weight


def _same(module: nn.Module, layer) -> bool:
    weight, base = getattr(module, "weight", None), _base_weight(layer)
    return isinstance(weight, torch.Tensor) and weight.shape == base.shape and torch.equal(weight, base.to(weight.dtype))


def module_map(model, ref: nn.Module) -> dict[tuple[str, str], str]:
    """(part, vlmkit module path) -> the transformers module name, for every adapted layer."""
    ref_modules = dict(ref.named_modules())
    out = {}
    for part, layers in _adapted_layers(model).items():
        if not layers:
            continue
        first_name, first = layers[0]
        pieces = first_name.split(".")
        rule = None
        for k in range(len(pieces)):
            suffix = ".".join(pieces[k:])
            for name, module in ref_modules.items():
                if (name == suffix or name.endswith("." + suffix)) and _same(module, first):
                    rule = (".".join(pieces[:k]), name[: len(name) - len(suffix)])
                    break
            if rule:
                break
        if rule is None:
            raise ExportError(f"LoRA layer {part}.{first_name}: no module of the exported transformers model has its name and base weight")
        strip, add = rule
        for name, layer in layers:
            rest = name[len(strip) + 1:] if strip else name
            target = add + rest
            module = ref_modules.get(target)
            if module is None or not _same(module, layer):
                raise ExportError(f"LoRA layer {part}.{name}: the exported model's {target!r} is not its base layer")
            out[part, name] = target
    return out


@torch.no_grad()
def export_hf_peft(model, out: str | Path, *, overwrite: bool = False) -> Path:
    """Base model in its family's transformers format at `out`, the adapters as PEFT at `out/adapter`."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    if not model.lora_spec:
        raise ExportError("the model carries no LoRA adapters (load the checkpoint with merge=False; "
                          "a checkpoint without adapters.safetensors has none)")
    spec = model.lora_spec
    out = claim_output(out, command="export-hf", sources=model_sources(model), overwrite=overwrite)
    staging = staging_folder(out)
    try:
        with adapters_removed(model):
            base = export_hf(model, staging / "model")
        family = family_for(family_of(model))
        cls = _reference_class(model, family)
        ref = cls.from_pretrained(base, local_files_only=True, dtype=torch.float32).eval()
        names = module_map(model, ref)
        config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"], bias="none",
                            target_modules=sorted(set(names.values())), base_model_name_or_path=str(out.resolve()))
        peft_model = get_peft_model(ref, config)
        state = {}
        layers = dict(((part, name), layer) for part, items in _adapted_layers(model).items() for name, layer in items)
        for (part, name), target in names.items():
            layer = layers[part, name]
            for kind in ("lora_A", "lora_B"):
                weight = getattr(layer, kind)[ADAPTER_NAME].weight
                state[f"base_model.model.{target}.{kind}.weight"] = weight.detach().float().cpu().clone()
        result = set_peft_model_state_dict(peft_model, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ExportError(f"PEFT did not take adapter tensors {unexpected[:3]}")
        peft_model.save_pretrained(base / ADAPTER_DIR, safe_serialization=True)
        return publish(base, out, command="export-hf")
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after a swap: the previous export


def _reference_class(model, family) -> type:
    """The transformers class of the family (its `reference` names it; LLaVA-1.5 has none)."""
    if family.reference is None:
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration
    from PIL import Image

    size = model.config.processor.image_size
    prompt = build_chat_processor(model, 1 << 20).encode_prompt([Message("user", "<image>\nDescribe the image.")],
                                                                [Image.new("RGB", (size, size), (120, 90, 60))])
    cls, _ = family.reference(model, prompt, prompt.input_ids[None])
    return cls


@torch.no_grad()
def verify_peft_export(model, folder: str | Path) -> float:
    """Largest |logit difference| between vlmkit's unmerged adapted model and transformers' reload
    of the base wrapped by `PeftModel.from_pretrained(..., folder / "adapter")`, on one image+text
    prompt of the family's layout."""
    from peft import PeftModel
    from PIL import Image

    folder = Path(folder)
    family = family_for(family_of(model))
    g = torch.Generator().manual_seed(0)
    size = model.config.processor.image_size
    image = Image.fromarray((torch.rand(size, size * 3 // 2, 3, generator=g) * 255).byte().numpy())
    prompt = build_chat_processor(model, 1 << 20).encode_prompt([Message("user", "<image>\nDescribe the image.")], [image])
    ids = prompt.input_ids[None]
    extra = {"position_ids": prompt.position_ids[:, None].to(model.device)} if prompt.position_ids is not None else {}
    ours = model(ids.to(model.device), VisualBatch(prompt.images), **extra).logits.float().cpu()
    if family.reference is None:
        from transformers import LlavaForConditionalGeneration

        cls, kwargs = LlavaForConditionalGeneration, {"pixel_values": prompt.images[0].pixel_values}
    else:
        cls, kwargs = family.reference(model, prompt, ids)
    ref = cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    ref = PeftModel.from_pretrained(ref, folder / ADAPTER_DIR).eval()
    theirs = ref(input_ids=ids, **kwargs).logits.float()
    return float((ours - theirs[..., : ours.shape[-1]]).abs().max())
