"""Throughput telemetry: tokens/s, images/s, data-wait against compute, MFU and peak memory.

MFU counts the model's own FLOPs per step from its parameter counts and the step's real token
counts (padding excluded): 2 FLOPs per parameter per token forward; backward costs another
2 for activation gradients wherever something upstream trains, and 2 more for weight gradients
where the part itself trains. Attention adds 2*L*d*T^2 forward per sample (causal), the LM
head runs only on supervised positions, and a cached frozen vision tower costs nothing.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field

import torch

# Dense bf16 tensor-core peaks (TFLOP/s), by device-name fragment: the usual MFU denominators.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0,
                   "A10G": 70.0, "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 125.0}


def peak_flops(device: torch.device, configured_tflops: float | None) -> float | None:
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, tflops in GPU_PEAK_TFLOPS.items():
            if fragment in name:
                return tflops * 1e12
    return None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is in KiB on Linux: the process's resident high-water mark.
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


@dataclass
class FlopModel:
    """Per-token and per-image costs of one model under one stage's freeze spec."""

    llm_params: int  # decoder blocks (no embeddings, no head)
    layers: int
    width: int
    head_params: int
    vision_params: int
    connector_params: int
    patches_per_image: int
    trains: set[str] = field(default_factory=set)
    vision_cached: bool = False

    @classmethod
    def of(cls, model, trainable: list[str], vision_cached: bool) -> "FlopModel":
        llm = model.llm
        emb = llm.get_input_embeddings()
        head = llm.get_output_embeddings()
        decoder = llm.base_model
        body = _params(decoder) - _params(emb)
        cfg = llm.config
        h, w = model.image_grid
        extra = _params(model.parts().get("cross_attention"))
        return cls(body + extra, cfg.num_hidden_layers, cfg.hidden_size, head.weight.numel(), _params(model.vision),
                   _params(model.connector), h * w, set(trainable), vision_cached)

    def step_flops(self, seq_lengths: list[int], supervised: int, images: int) -> float:
        def mult(part: str, upstream: set[str]) -> int:
            # forward 2; activation grads 2 if this part or anything before it trains; weight grads 2.
            grads_through = part in self.trains or bool(self.trains & upstream)
            return 2 + 2 * grads_through + 2 * (part in self.trains)

        vision = set() if self.vision_cached else {"vision"}
        llm_mult = mult("llm", vision | {"connector", "cross_attention"})
        flops = self.llm_params * sum(seq_lengths) * llm_mult
        flops += self.layers * self.width * sum(t * t for t in seq_lengths) * llm_mult
        flops += self.head_params * supervised * mult("llm", vision | {"connector", "cross_attention", "llm"})
        flops += self.connector_params * images * self.patches_per_image * mult("connector", vision)
        if not self.vision_cached:
            flops += self.vision_params * images * self.patches_per_image * mult("vision", set())
        return float(flops)


class Telemetry:
    """Accumulates one optimizer step's timings and counts, and turns them into rates."""

    def __init__(self, device: torch.device, peak: float | None):
        self.device = device
        self.peak = peak
        self.reset()

    def reset(self) -> None:
        self.data_s = 0.0
        self.compute_s = 0.0
        self.tokens = 0
        self.padded = 0
        self.images = 0
        self.flops = 0.0
        self._mark = time.perf_counter()

    def data_done(self) -> None:
        now = time.perf_counter()
        self.data_s += now - self._mark
        self._mark = now

    def compute_done(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.compute_s += now - self._mark
        self._mark = now

    def record(self, world_totals: dict[str, float]) -> dict[str, float]:
        """Rates for the step; `world_totals` are counts already summed over ranks."""
        wall = self.data_s + self.compute_s
        out = {
            "tokens_per_s": world_totals["tokens"] / wall if wall else 0.0,
            "images_per_s": world_totals["images"] / wall if wall else 0.0,
            "data_s": self.data_s,
            "compute_s": self.compute_s,
            "data_share": self.data_s / wall if wall else 0.0,
            "padding_share": world_totals["padded"] / max(1.0, world_totals["padded"] + world_totals["tokens"]),
            "peak_memory_gb": peak_memory_bytes(self.device) / 1e9,
        }
        if self.peak:
            out["mfu"] = world_totals["flops"] / (wall * self.peak * world_totals["ranks"]) if wall else 0.0
        return out
