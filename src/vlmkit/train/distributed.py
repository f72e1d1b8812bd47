"""Data parallelism on PyTorch's own engine: DDP or FSDP2 (`fully_shard`), set up from the
environment torchrun provides, so `vlmkit train` runs unchanged under
`torchrun --nproc_per_node=N` (and across nodes with `--nnodes/--node_rank/--rdzv-endpoint`).

`batch_size` in a recipe is the global micro-batch: each rank takes a contiguous slice of every
micro-batch, and the loop normalises the loss by counts reduced over all ranks, so N processes
compute the same step as one process holding the whole batch.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class Single:
    """One process (or a world whose strategy needs no wrapping): the model trains as it is."""

    name = "single"

    def wrap(self, model, ctx: "DistContext"):
        """The module the training step calls; `model` itself stays the unwrapped VLM."""
        return model

    def no_sync(self, wrapped, last: bool):
        """Around a micro-batch's backward: skip the gradient all-reduce except on the last one."""
        return contextlib.nullcontext()

    def full_optimizer_state(self, model, optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)


class DDP(Single):
    """Replicated model; gradients averaged over ranks in backward."""

    name = "ddp"

    def wrap(self, model, ctx: "DistContext"):
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [ctx.local_rank] if next(model.parameters()).is_cuda else None
        # Built per stage: DDP registers the parameters that require grad at construction.
        return DistributedDataParallel(model, device_ids=device_ids)

    def no_sync(self, wrapped, last: bool):
        return contextlib.nullcontext() if last else wrapped.no_sync()


class FSDP2(Single):
    """Parameters, gradients and optimizer state sharded (`fully_shard`); checkpoints gather them whole."""

    name = "fsdp2"

    def wrap(self, model, ctx: "DistContext"):
        shard_fsdp2(model)
        return model

    def full_optimizer_state(self, model, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


STRATEGIES = {"ddp": DDP, "fsdp2": FSDP2}


@dataclass
class DistContext:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    strategy: Single = field(default_factory=Single)  # Single, DDP or FSDP2
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of a micro-batch of n (an epoch's tail may not divide)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def all_sum(self, values: list[float]) -> list[float]:
        """Sum plain numbers over ranks (in float64, so token counts stay exact)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        return t.cpu().tolist()

    def any(self, flag: bool) -> bool:
        return bool(self.all_sum([float(flag)])[0]) if self.enabled else flag

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather_objects(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(strategy: str, device: str) -> DistContext:
    """Join the process group torchrun describes in the environment (a no-op in one process)."""
    world = world_size_from_env()
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
        owns = True
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown distributed strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    return DistContext(world, rank, local_rank, STRATEGIES[strategy](), owns)


def check_divides(ctx: DistContext, stage_name: str, batch_size: int) -> None:
    if batch_size % ctx.world_size:
        raise ValueError(
            f"stage {stage_name}: batch_size {batch_size} is the global micro-batch and must be divisible by the "
            f"world size {ctx.world_size} (each rank takes an equal share); use a multiple of {ctx.world_size}"
        )


def local_device(ctx: DistContext, device: str) -> str:
    if ctx.enabled and device.startswith("cuda"):
        return f"cuda:{ctx.local_rank}"
    return device


def wrap(model, ctx: DistContext):
    """The module the training step calls (see `Single.wrap`)."""
    return ctx.strategy.wrap(model, ctx)


def shard_fsdp2(model) -> None:
    """`fully_shard` each decoder layer, then the whole model (vision tower, connector and the
    rest form the root group). Applied once; later stages only flip requires_grad."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return
    layers = getattr(model.llm.base_model, "layers", None)
    if layers is None:
        raise ValueError("fsdp2 needs an LLM whose decoder keeps its blocks in `.layers`")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def unsharded(model):
    """A context where an FSDP2 model's parameters are whole (for calls outside forward)."""
    from contextlib import contextmanager

    @contextmanager
    def ctx():
        from torch.distributed.fsdp import FSDPModule

        if isinstance(model, FSDPModule):
            model.unshard()
            try:
                yield
            finally:
                model.reshard()
        else:
            yield

    return ctx()


def full_optimizer_state(model, optimizer, ctx: DistContext) -> dict:
    """The optimizer state as plain tensors, gathered from shards when FSDP2 holds them."""
    return ctx.strategy.full_optimizer_state(model, optimizer)


def load_optimizer_state(model, optimizer, state: dict, ctx: DistContext) -> None:
    ctx.strategy.load_optimizer_state(model, optimizer, state)
