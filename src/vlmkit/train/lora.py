"""LoRA adapters through `peft`, set per stage (`lora: {parts: [llm], r, alpha, dropout, targets}`).

peft's `inject_adapter_in_model` swaps each targeted `nn.Linear` of a part for a LoRA layer in
place (no `PeftModel` wrapper), so the rest of vlmkit keeps seeing the same modules: the part's
`base_model`, its embeddings, the decoder layers. Only the adapter matrices train.

Checkpoints keep the two apart:
* `model.safetensors` holds base weights under their plain names (`q_proj.weight`, not peft's
  `q_proj.base_layer.weight`), so a checkpoint without adapters and one with them share a format,
  and a frozen pretrained part is not written at all;
* `adapters.safetensors` holds the adapter matrices (`<part>.<module>.lora_A.weight`, peft's
  saved-adapter naming), and `meta.json["lora"]` the spec that rebuilds them.
Resuming re-injects the adapters from that spec and loads them; inference (`load_checkpoint`)
merges them into the base weights (W + B A * alpha / r), which is also what `export-hf` writes.

QLoRA (4-bit base weights) needs bitsandbytes and a CUDA GPU; elsewhere it is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

ADAPTERS = "adapters.safetensors"
ADAPTER_NAME = "default"


def is_lora_key(key: str) -> bool:
    return ".lora_" in key or key.startswith("lora_")


def lora_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


def has_adapters(model) -> bool:
    return bool(getattr(model, "lora_spec", None))


def check_quantization(spec: dict, device: str) -> None:
    if not spec.get("quantize"):
        return
    import importlib.util

    problems = []
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append("bitsandbytes is not installed")
    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        problems.append(f"the training device is {device!r}, not a CUDA GPU")
    if problems:
        raise ValueError(f"lora.quantize={spec['quantize']!r} (QLoRA, 4-bit base weights) needs bitsandbytes and a CUDA GPU, "
                         f"but {' and '.join(problems)}; drop `quantize` to train plain LoRA (full-precision base weights)")
    raise ValueError("lora.quantize (QLoRA) is not implemented yet in vlmkit; drop `quantize` to train plain LoRA")


def add_adapters(model, spec: dict) -> None:
    """Inject LoRA layers into each part of `spec["parts"]`; only they train in those parts."""
    from peft import LoraConfig, inject_adapter_in_model

    if has_adapters(model):
        if model.lora_spec == spec:
            return
        raise ValueError(f"the model already carries adapters {model.lora_spec}; merge them before adding {spec}")
    parts = model.parts()
    for name in spec["parts"]:
        if name not in parts:
            raise ValueError(f"lora.parts names {name!r}, but the model's parts are {sorted(parts)}")
        config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                            target_modules=list(spec["targets"]), bias="none")
        try:
            inject_adapter_in_model(config, parts[name], adapter_name=ADAPTER_NAME)
        except ValueError as e:  # peft: "Target modules ... not found in the base model"
            raise ValueError(f"lora.targets {spec['targets']} match no layer of part {name!r}: {e}") from None
        for pname, p in parts[name].named_parameters():
            p.requires_grad_(is_lora_key(pname))
    model.lora_spec = dict(spec)


@torch.no_grad()
def merge_adapters(model) -> None:
    """Fold every adapter into its base weight and put the plain layer back."""
    if not has_adapters(model):
        return
    for part in model.lora_spec["parts"]:
        module = model.parts()[part]
        for name, layer in lora_layers(module):
            layer.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, layer.get_base_layer())
    model.lora_spec = None


def base_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A part's state with peft's wrapping undone: no adapter tensors, plain base names."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if not is_lora_key(k)}


def to_module_keys(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain base names -> the names the (possibly LoRA-wrapped) module uses."""
    names = {k.replace(".base_layer.", "."): k for k in module.state_dict() if not is_lora_key(k)}
    return {names.get(k, k): v for k, v in state.items()}


def adapter_state(model) -> dict[str, torch.Tensor]:
    out = {}
    for part in model.lora_spec["parts"]:
        for key, value in model.parts()[part].state_dict().items():
            if is_lora_key(key):
                out[f"{part}.{key.replace(f'.{ADAPTER_NAME}.', '.')}"] = value.detach().contiguous().cpu()
    return out


def save_adapters(model, directory: Path) -> None:
    from safetensors.torch import save_file

    save_file(adapter_state(model), str(Path(directory) / ADAPTERS), metadata={"format": "pt"})


def load_adapters(model, directory: Path, spec: dict) -> None:
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTERS
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: meta.json lists LoRA adapters but {ADAPTERS} is missing")
    add_adapters(model, spec)
    saved = load_file(str(path))
    for part in spec["parts"]:
        module = model.parts()[part]
        prefix = f"{part}."
        wanted = {k for k in module.state_dict() if is_lora_key(k)}
        sub = {}
        for key, value in saved.items():
            if key.startswith(prefix):
                # Put peft's adapter name back: q_proj.lora_A.weight -> q_proj.lora_A.default.weight
                head, _, tail = key[len(prefix):].rpartition(".")
                sub[f"{head}.{ADAPTER_NAME}.{tail}"] = value
        if set(sub) != wanted:
            raise ValueError(f"{path}: part {part!r} adapters do not match the spec {spec} "
                             f"(missing {sorted(wanted - set(sub))[:3]}, unexpected {sorted(set(sub) - wanted)[:3]})")
        module.load_state_dict(sub, strict=False)
