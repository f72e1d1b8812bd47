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

QLoRA (`quantize: 4bit`): before the adapters go in, every linear layer of the part but its output
head becomes a bitsandbytes `Linear4bit` (NF4 with double quantization, the QLoRA paper's
choice), so the frozen base takes a quarter of its bf16 memory while training. It runs where
bitsandbytes has 4-bit kernels: a CUDA GPU, and the CPU (bitsandbytes >= 0.48). The quantization
is a training device only. Checkpoints never hold 4-bit weights: a QLoRA part trains only
through its adapters, so its base is not written, and inference (`load_checkpoint`) merges the
adapters into the full-precision pretrained base, as `PeftModel.merge_and_unload` on a bf16 base
does. Resuming quantizes again (deterministic), so a resumed run sees the same base.
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
    return bool(model.lora_spec)


# Devices bitsandbytes has 4-bit kernels for.
QUANTIZABLE_DEVICES = ("cuda", "cpu")


def check_quantization(spec: dict, device: str | torch.device) -> None:
    """Refuse QLoRA, with the reason, where bitsandbytes cannot quantize: not installed (or too old
    for CPU kernels), or a device it has no 4-bit kernels for."""
    if not spec.get("quantize"):
        return
    import importlib.util

    device = torch.device(device)
    problems = []
    if importlib.util.find_spec("bitsandbytes") is None:
        problems.append("bitsandbytes is not installed (pip install 'vlmkit[qlora]')")
    elif device.type == "cpu":
        from importlib.metadata import version

        from packaging.version import Version

        if Version(version("bitsandbytes")) < Version("0.48"):
            problems.append(f"bitsandbytes {version('bitsandbytes')} has no CPU 4-bit kernels (0.48 or newer has)")
    if device.type not in QUANTIZABLE_DEVICES:
        problems.append(f"the training device is {str(device)!r}; bitsandbytes quantizes on {' and '.join(QUANTIZABLE_DEVICES)} only")
    if device.type == "cuda" and not torch.cuda.is_available():
        problems.append(f"the training device is {str(device)!r} but torch sees no CUDA GPU")
    if problems:
        raise ValueError(f"lora.quantize={spec['quantize']!r} (QLoRA, 4-bit base weights) cannot run: {'; '.join(problems)}. "
                         "Drop `quantize` to train plain LoRA (full-precision base weights).")


def is_quantized(layer: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear (not peft's LoRA wrapper around one, which shares its name)."""
    kind = type(layer)
    return kind.__name__ == "Linear4bit" and kind.__module__.startswith("bitsandbytes")


def quantize_linears(module: nn.Module, keep: tuple[nn.Module, ...] = ()) -> int:
    """Swap every `nn.Linear` under `module` (except those in `keep`) for a bitsandbytes NF4
    `Linear4bit` on the layer's own device; returns how many were swapped."""
    import bitsandbytes as bnb

    swapped = 0
    for name, layer in list(module.named_modules()):
        if type(layer) is not nn.Linear or any(layer is k for k in keep):
            continue
        weight = layer.weight
        quantized = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                      compute_dtype=weight.dtype, quant_type="nf4", compress_statistics=True, device="meta")
        # Params4bit packs the weight when it reaches its device, so hand it over on the CPU first.
        quantized.weight = bnb.nn.Params4bit(weight.data.detach().to("cpu", copy=True), requires_grad=False,
                                             quant_type="nf4", compress_statistics=True)
        if layer.bias is not None:
            quantized.bias = nn.Parameter(layer.bias.data.detach().clone(), requires_grad=False)
        quantized = quantized.to(weight.device)
        # On an AVX512-BF16 CPU, bitsandbytes (0.50) repacks a layer's weight in place on its first
        # eval-mode forward, for a bf16 inference kernel; a training step after that (a held-out
        # check mid-stage) computes garbage. Keep the one layout that both paths read.
        quantized.support_avx512bf16_for_cpu = False
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name) if parent_name else module, child, quantized)
        swapped += 1
    return swapped


def dequantized_linear(layer: nn.Module, dtype: torch.dtype) -> nn.Linear:
    """A plain `nn.Linear` holding a `Linear4bit`'s weights as they compute (dequantized)."""
    import bitsandbytes.functional as bnbf

    weight = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device, dtype=dtype)
    plain.weight.data.copy_(weight)
    if layer.bias is not None:
        plain.bias.data.copy_(layer.bias.data)
    return plain.requires_grad_(False)


def add_adapters(model, spec: dict, quantize: bool = True) -> None:
    """Inject LoRA layers into each part of `spec["parts"]`; only they train in those parts.
    With `spec["quantize"]` (and `quantize`), the part's base linears become 4-bit first."""
    from peft import LoraConfig, inject_adapter_in_model

    if has_adapters(model):
        if model.lora_spec == spec:
            _train_only_adapters(model, spec)  # `set_trainable` just made the whole part trainable
            return
        raise ValueError(f"the model already carries adapters {model.lora_spec}; merge them before adding {spec}")
    parts = model.parts()
    for name in spec["parts"]:
        if name not in parts:
            raise ValueError(f"lora.parts names {name!r}, but the model's parts are {sorted(parts)}")
        if spec.get("quantize") and quantize:
            check_quantization(spec, next(parts[name].parameters()).device)
            if name not in model.pretrained_parts:
                raise ValueError(f"lora.quantize: part {name!r} is randomly initialised; QLoRA quantizes pretrained weights only")
            head = model.llm.get_output_embeddings() if name == "llm" else None
            quantize_linears(parts[name], keep=(head,) if head is not None else ())
        config = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                            target_modules=list(spec["targets"]), bias="none")
        try:
            inject_adapter_in_model(config, parts[name], adapter_name=ADAPTER_NAME)
        except ValueError as e:  # peft: "Target modules ... not found in the base model"
            raise ValueError(f"lora.targets {spec['targets']} match no layer of part {name!r}: {e}") from None
    _train_only_adapters(model, spec)
    model.lora_spec = dict(spec)


def _train_only_adapters(model, spec: dict) -> None:
    for name in spec["parts"]:
        for pname, p in model.parts()[name].named_parameters():
            if p.is_floating_point():
                p.requires_grad_(is_lora_key(pname))


@torch.no_grad()
def merge_adapters(model) -> None:
    """Fold every adapter into its base weight and put the plain layer back."""
    if not has_adapters(model):
        return
    for part in model.lora_spec["parts"]:
        module = model.parts()[part]
        dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
        for name, layer in lora_layers(module):
            base = layer.get_base_layer()
            if is_quantized(base):
                # Merge in full precision into the weights the adapter was trained against;
                # peft would quantize the sum again.
                merged = dequantized_linear(base, dtype)
                merged.weight.data += layer.get_delta_weight(ADAPTER_NAME).to(dtype)
            else:
                layer.merge(safe_merge=True)
                merged = base
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, merged)
        for name, layer in list(module.named_modules()):
            if is_quantized(layer):  # quantized layers no adapter targeted
                parent_name, _, child = name.rpartition(".")
                setattr(module.get_submodule(parent_name) if parent_name else module, child, dequantized_linear(layer, dtype))
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


def load_adapters(model, directory: Path, spec: dict, quantize: bool = True) -> None:
    """`quantize=False` puts QLoRA adapters on the full-precision base (inference, export)."""
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTERS
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: meta.json lists LoRA adapters but {ADAPTERS} is missing")
    add_adapters(model, spec, quantize=quantize)
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
