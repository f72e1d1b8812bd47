"""Weight-only int8 linear layers for serving, through torchao.

Every `nn.Linear` of the language model, the connector and the vision tower keeps its weight as
int8 with one scale per output row; activations stay in the model's precision. On a CPU the
products run on int8-weight kernels (`aten._weight_int8pack_mm`), so decoding streams a quarter
of the bytes per step; the float weights are released.
"""

from __future__ import annotations

import ctypes
import gc
import sys

from torch import nn

QUANTIZE_MODES = ("int8",)


class QuantizationError(ValueError):
    pass


def _is_linear(module: nn.Module, name: str) -> bool:
    # Tiny maps (a norm-sized projection) cost more in kernel overhead than they save.
    return isinstance(module, nn.Linear) and module.in_features >= 16 and module.out_features >= 16


def quantize_weights(model, mode: str) -> None:
    """Quantize `model`'s linear layers in place (`mode`: "int8", weight-only)."""
    if mode not in QUANTIZE_MODES:
        raise QuantizationError(f"--quantize: unknown mode {mode!r}; choose from {', '.join(QUANTIZE_MODES)}")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise QuantizationError("--quantize int8 needs torchao, which is not installed: pip install 'vlmkit[serve-int8]'") from None
    for part in model.parts().values():
        quantize_(part, Int8WeightOnlyConfig(), filter_fn=_is_linear)
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
