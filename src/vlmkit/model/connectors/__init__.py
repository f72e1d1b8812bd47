"""Connector families; importing this package registers them all."""

from vlmkit.model.connectors import (  # noqa: F401
    mlp,
    native,
    patch_embed,
    patch_merger,
    perceiver,
    pixel_shuffle,
    pooling,
    qformer,
)
from vlmkit.model.connectors.base import Connector, build_connector  # noqa: F401

# The native-resolution tower the `native` connector is paired with; imported for its registration.
from vlmkit.model import rope_vit  # noqa: E402,F401
# Qwen2-VL's own tower and M-RoPE decoder (registered here so every registry listing has them).
from vlmkit.model import qwen2vl  # noqa: E402,F401
# Llama 3.2 Vision's tower and cross-attention decoder (transformers' own modules).
from vlmkit.model import mllama  # noqa: E402,F401
# BLIP-2 / InstructBLIP's vision transformer (paired with the qformer connector).
from vlmkit.model import blip  # noqa: E402,F401
