"""Which precision a device trains in fastest: bfloat16 where the hardware computes it natively,
float32 elsewhere.

On a CPU without native bf16 (AVX2 only: AMD before Zen 4, Intel before Cooper Lake), PyTorch
emulates bf16 matmuls and they run 30-56x slower than fp32; with AVX512-BF16 or AMX they run
about twice as fast. The CPU's flags say which (Linux `/proc/cpuinfo`; aarch64 calls it `bf16`).
"""

from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (empty where the system does not list them)."""
    try:
        text = CPUINFO.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


def native_bf16(device: str) -> bool:
    """Whether `device` computes bf16 matmuls natively."""
    if device.startswith("cuda"):
        import torch  # a config may be read before any model: torch only when a GPU is named

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.startswith("mps"):
        return False
    return bool(NATIVE_BF16_FLAGS & cpu_flags())


def resolve_precision(precision: str, device: str) -> str:
    """`auto` -> `bf16` where the device has native bf16, else `fp32`; other values as given."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def bf16_slowdown(size: int = 384, repeats: int = 3) -> float:
    """How many times slower a bf16 matmul is than an fp32 one on this CPU, measured now."""
    import torch  # measured only when a recipe forces bf16 on a CPU without it

    def best(dtype) -> float:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times[1:])

    return best(torch.bfloat16) / max(best(torch.float32), 1e-9)
