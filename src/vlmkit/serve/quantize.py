"""Weight-only int8 linear layers for serving, through torchao.

Every `nn.Linear` of the language model (but its output head), the connector and the vision tower
keeps its weight as int8 with one scale per output row; activations stay in the model's
precision, and the float weights are released. What it saves is memory: torchao's weight-only
int8 linear converts the int8 weight to the activations' dtype at each call, so a product costs
at least what the float one does (docs/serving.md has the figures).
"""

from __future__ import annotations

import ctypes
import gc
import sys

from torch import nn

QUANTIZE_MODES = ("int8",)


class QuantizationError(ValueError):
    pass


def _linear_filter(keep: nn.Module):
    def is_quantized(module: nn.Module, name: str) -> bool:
        # Tiny maps (a norm-sized projection) cost more in kernel overhead than they save.
        return isinstance(module, nn.Linear) and module is not keep and module.in_features >= 16 and module.out_features >= 16
    return is_quantized


def quantize_weights(model, mode: str) -> None:
    """Quantize `model`'s linear layers in place (`mode`: "int8", weight-only)."""
    if mode not in QUANTIZE_MODES:
        raise QuantizationError(f"--quantize: unknown mode {mode!r}; choose from {', '.join(QUANTIZE_MODES)}")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise QuantizationError("--quantize int8 needs torchao, which is not installed: pip install 'vlmkit[serve-int8]'") from None
    # The LM head stays in float: it decides every argmax (int8 rounding there changes answers
    # most), and most heads share their weight with the input embeddings, which stay in float
    # anyway, so quantizing it would add memory, not save it.
    keep = model.llm.get_output_embeddings()
    for part in model.parts().values():
        quantize_(part, Int8WeightOnlyConfig(), filter_fn=_linear_filter(keep))
    _release_float_weights(model)


def _release_float_weights(model) -> None:
    """Give the float weights' memory back. Weights loaded from safetensors live in a mapping of
    the file, which stays resident (every page was read to quantize it) while any tensor of it is
    alive: the tensors left in float (embeddings, norms) get their own copies, so the mapping goes;
    then the C heap's freed pages are returned (glibc)."""
    seen = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if type(p) is nn.Parameter and id(p) not in seen:
                seen.add(id(p))
                p.data = p.data.clone()
        for name, b in list(module.named_buffers(recurse=False)):
            if b is not None:
                module._buffers[name] = b.clone()
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass
