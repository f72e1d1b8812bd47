"""The training input pipeline: micro-batches encoded on demand in DataLoader workers.

The sampler (in the training process) walks the seeded, endless sequence of global micro-batches
(`sources.micro_batches`), skips what a resumed run already consumed and hands each rank its share.
A worker reads those records from their source, encodes them (image load, preprocessing,
tokenisation, labels) and builds the `Batch`. The order is fixed by the sampler alone, and the
DataLoader returns batches in sampler order whatever the number of workers, so a run is the same
with 0, 1 or 8 workers and resumes bit for bit.

Bad records are never raised inside a worker (a worker's exception reaches the training process as
a RuntimeError); each micro-batch carries the records it had to leave out, and the training
process counts them, or stops on the first one with `on_bad_record: error`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from dataclasses import dataclass, field

import torch

from vlmkit.data.collate import Batch, collate, pack
from vlmkit.data.formats import BadRecordError
from vlmkit.data.sources import Mixture, StreamCursor, micro_batches
from vlmkit.model.vlm import IGNORE_INDEX
from vlmkit.processing.prompt import ChatProcessor, EncodedSample


def check_text_size(processor: ChatProcessor, sample) -> None:
    """Refuse a record whose text cannot fit the context whatever its tokens, before any of it is
    tokenised: the Rust tokenizer takes some 65 bytes of memory per byte of text, and aborts the
    whole process (not the record) when that runs out."""
    chars = sum(len(m.content) for m in sample.messages)
    per_token = processor.longest_token
    if chars > processor.max_length * per_token:
        raise BadRecordError(sample.id, f"holds {chars} characters of text, more than a context of {processor.max_length} "
                                        f"tokens can hold (a token stands for at most {per_token}); not tokenised")


def encode_record(processor: ChatProcessor, sample) -> EncodedSample:
    """`processor.encode`, with any failure a `BadRecordError` naming the record: a template that
    refuses the conversation or a tokenizer that refuses the text is the record's fault too."""
    try:
        check_text_size(processor, sample)
        return processor.encode(sample)
    except BadRecordError:
        raise
    except Exception as e:  # noqa: BLE001 - anything a record's content can provoke
        raise BadRecordError(sample.id, f"cannot be encoded ({type(e).__name__}: {str(e)[:300]})") from e


def last_turn_only(sample: EncodedSample) -> EncodedSample:
    """Keep labels on the final assistant turn only: a DPO response is that turn, and earlier
    assistant turns belong to the shared prompt."""
    supervised = (sample.labels != IGNORE_INDEX).nonzero().flatten()
    labels = torch.full_like(sample.labels, IGNORE_INDEX)
    if supervised.numel():
        # The last turn's tokens are the final contiguous run of supervised positions.
        gaps = (supervised[1:] - supervised[:-1] > 1).nonzero().flatten()
        first = supervised[int(gaps[-1]) + 1] if gaps.numel() else supervised[0]
        labels[first:] = sample.labels[first:]
    return dataclasses.replace(sample, labels=labels)


def image_content_key(image) -> str:
    """A digest of an image's preprocessed views (pixels, roles, grids): equal keys mean equal
    tower inputs, whatever file or bytes they came from and whatever settings made them."""
    h = hashlib.blake2b(digest_size=20)
    for view, pixels in zip(image.views, image.view_pixels()):
        h.update(repr((view.role, tuple(view.grid) if view.grid is not None else None, tuple(pixels.shape), str(pixels.dtype))).encode())
        h.update(pixels.detach().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@dataclass
class MicroBatch:
    """One rank's share of one global micro-batch, encoded and batched."""

    batch: Batch | None  # None when every record of this share was bad
    indices: list[int]  # global indices of the units in the batch
    counts: list[int]  # SFT: supervised targets per unit (for the step's normaliser)
    refs: list[tuple[float | None, float | None]]  # DPO: per pair, reference log-probs from the data
    skipped: list[tuple[int, str, str]] = field(default_factory=list)  # (global index, record id, message)
    image_keys: list[str] | None = None  # per image of `batch.images`: content key (for the feature cache)
    global_indices: list[int] = field(default_factory=list)  # the whole global micro-batch
    samples: list[EncodedSample] | None = None  # the encoded units (first of each), for objectives that build their own batches

    def pin_memory(self) -> "MicroBatch":
        if self.batch is not None:
            pin = lambda t: t.pin_memory() if isinstance(t, torch.Tensor) else t  # noqa: E731
            self.batch = Batch(**{f.name: pin(getattr(self.batch, f.name)) for f in dataclasses.fields(self.batch)})
        return self


class StageDataset(torch.utils.data.Dataset):
    """Map-style dataset whose item is a whole micro-batch: given (this rank's global indices,
    the global micro-batch, the rows of streamed records or None), returns a `MicroBatch`.
    Runs in DataLoader workers."""

    def __init__(self, mixture: Mixture, processor: ChatProcessor, *, dpo: bool, pad_id: int, packing: bool = False,
                 capacity: int = 0, max_images: int | None = None, image_keys: bool = False, keep_samples: bool = False):
        self.mixture, self.processor, self.dpo = mixture, processor, dpo
        self.pad_id, self.packing, self.capacity, self.max_images = pad_id, packing, capacity, max_images
        self.image_keys, self.keep_samples = image_keys, keep_samples

    def unit(self, g: int, row: dict | None = None) -> tuple[list[EncodedSample], tuple]:
        if row is not None:  # a streamed source's row, read by the sampler
            k, p = self.mixture.locate(g)
            item = self.mixture.sources[k].row_sample(row, p)
        else:
            item = self.mixture.record(g)
        if self.dpo:
            pair = [last_turn_only(encode_record(self.processor, item.sample(side))) for side in ("chosen", "rejected")]
            return pair, (item.ref_chosen_logp, item.ref_rejected_logp)
        return [encode_record(self.processor, item)], (None, None)

    def __getitem__(self, item: tuple) -> MicroBatch:
        mine, global_indices, rows = item
        units, indices, refs, skipped = [], [], [], []
        for g, row in zip(mine, rows):
            try:
                unit, ref = self.unit(g, row)
            except BadRecordError as e:
                path = str(self.mixture.sources[self.mixture.locate(g)[0]].path)
                # Encoding errors name the record; the report names its file too.
                skipped.append((g, str(e.record_id), str(e) if str(e).startswith(path) else f"{path}: {e}"))
                continue
            units.append(unit)
            indices.append(g)
            refs.append(ref)
        counts = [int((u[0].labels[1:] != IGNORE_INDEX).sum()) for u in units]
        out = MicroBatch(self.make_batch(units) if units else None, indices, counts, refs, skipped, global_indices=list(global_indices))
        if self.keep_samples:
            out.samples = [u[0] for u in units]
        if self.image_keys and out.batch is not None:
            out.image_keys = [image_content_key(im) for im in out.batch.images]
        return out

    def make_batch(self, units: list[list[EncodedSample]]) -> Batch:
        # DPO: all chosen responses, then all rejected, in one forward.
        samples = [u[0] for u in units] + ([u[1] for u in units] if self.dpo else [])
        if self.packing:
            return pack(samples, self.pad_id, self.capacity, self.max_images)
        return collate(samples, self.pad_id)


def _identity(x):
    return x


def _as_bytes(mb: MicroBatch) -> bytes:
    # A micro-batch crosses from a worker as one pickled blob: its dozen small tensors would
    # otherwise each go through shared memory and a file-descriptor handoff, which costs more
    # than encoding small images. The blob comes from our own worker, never from a user's file.
    return pickle.dumps(mb, protocol=pickle.HIGHEST_PROTOCOL)


def receive(item, pin_memory: bool = False) -> MicroBatch:
    """A loader's item as a MicroBatch (unpickled when a worker sent it)."""
    mb = pickle.loads(item) if isinstance(item, bytes) else item
    return mb.pin_memory() if pin_memory and isinstance(item, bytes) else mb


def _worker_init(worker_id: int) -> None:
    # A SIGTERM to the whole process group (a scheduler's preemption) must reach the training
    # process alone: it finishes the step and saves. A worker that died of it first would make
    # the DataLoader raise in the middle of that save.
    import signal

    from vlmkit.utils import die_with_parent

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # And a worker dies with the training process: after a SIGKILL (or the OOM killer) nobody
    # reads its queue, and a worker blocked on sending a micro-batch would linger forever (off
    # Linux, PyTorch's own watchdog still ends idle workers).
    die_with_parent()


class RankSampler:
    """This rank's share of each global micro-batch, from position `skip` on (endless)."""

    def __init__(self, mixture: Mixture, batch_size: int, seed: int, stage: str, rank: int = 0, world_size: int = 1, skip: int = 0):
        self.mixture, self.batch_size, self.seed, self.stage = mixture, batch_size, seed, stage
        self.rank, self.world_size, self.skip = rank, world_size, skip

    def __iter__(self):
        it = micro_batches(self.mixture, self.batch_size, self.seed, self.stage, min_size=self.world_size)
        streams = StreamCursor(self.mixture, self.seed, self.stage)
        for _ in range(self.skip):
            streams.rows(next(it), set())  # a streamed source must be read up to the position
        for indices in it:
            base, extra = divmod(len(indices), self.world_size)
            start = self.rank * base + min(self.rank, extra)
            mine = tuple(indices[start : start + base + (self.rank < extra)])
            rows = streams.rows(indices, set(mine))
            yield mine, tuple(indices), tuple(rows.get(g) for g in mine)


class SequentialSampler:
    """Every unit once, in index order, `batch_size` at a time (for scoring passes)."""

    def __init__(self, n: int, batch_size: int):
        self.n, self.batch_size = n, batch_size

    def __iter__(self):
        for i in range(0, self.n, self.batch_size):
            chunk = tuple(range(i, min(self.n, i + self.batch_size)))
            yield chunk, chunk, (None,) * len(chunk)

    def __len__(self):
        return (self.n + self.batch_size - 1) // self.batch_size


def usable_workers(requested: int) -> int:
    """`train.num_workers`, capped at the CPUs this process may run on: each worker is a whole
    process with its own copy of the data pipeline, so a mistyped 100000 would otherwise spawn
    processes until memory ran out. The batches are the same for any number of workers."""
    import os
    import warnings

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if requested > cpus:
        warnings.warn(f"train.num_workers={requested} is more than the {cpus} CPU(s) this process may use; "
                      f"using {cpus} workers", stacklevel=3)
        return cpus
    return requested


def make_loader(dataset: StageDataset, sampler, num_workers: int, pin_memory: bool, prefetch: int = 2):
    """A DataLoader over whole micro-batches. Its own generator, so creating it never draws from
    the global RNG (which a resumed run restores and must find untouched)."""
    num_workers = usable_workers(num_workers)
    kwargs = {"prefetch_factor": prefetch, "persistent_workers": False} if num_workers > 0 else {}
    if num_workers > 0:
        # Forked workers must not use the tokenizer's thread pool (tokenizers warns, and could deadlock).
        import os

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # With workers, pinning happens after `receive` unpickles the blob (see `_as_bytes`).
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=sampler, num_workers=num_workers,
                                       collate_fn=_as_bytes if num_workers > 0 else _identity,
                                       pin_memory=pin_memory and num_workers == 0, generator=torch.Generator().manual_seed(0),
                                       worker_init_fn=_worker_init if num_workers > 0 else None, **kwargs)


def _record_error(rid: str, message: str) -> BadRecordError:
    """A BadRecordError with a worker's message as is (it already names the record and file)."""
    err = BadRecordError.__new__(BadRecordError)
    ValueError.__init__(err, message)
    err.record_id, err.reason = rid, message
    return err


class StageInput:
    """The stage's micro-batches for this rank, read and encoded by DataLoader workers, and where
    it stands: how many global micro-batches it has handed out, which records it had to leave
    out, and how many draws each mixture source has had."""

    def __init__(self, dataset: StageDataset, batch_size: int, seed: int, stage: str, rank: int, world_size: int,
                 num_workers: int, pin_memory: bool, prefetch: int, on_bad: str, consumed: int = 0,
                 source_counts: list[int] | None = None):
        mixture = dataset.mixture
        self.mixture, self.on_bad, self.pin_memory = mixture, on_bad, pin_memory
        self.consumed = consumed
        self.source_counts = list(source_counts or [0] * len(mixture.sources))
        self.skipped: dict[int, tuple[str, str]] = {}  # global index -> (record id, message), found while encoding
        sampler = RankSampler(mixture, batch_size, seed, stage, rank, world_size, skip=consumed)
        self._it = iter(make_loader(dataset, sampler, num_workers, pin_memory, prefetch))

    def next(self) -> MicroBatch:
        mb = receive(next(self._it), self.pin_memory)
        self.consumed += 1
        for g, rid, message in mb.skipped:
            if self.on_bad == "error":
                raise _record_error(rid, message)
            self.skipped[g] = (rid, message)
        for k, n in enumerate(torch.bincount(self.mixture.source_of(torch.tensor(mb.global_indices)),
                                             minlength=len(self.mixture.sources)).tolist()):
            self.source_counts[k] += n
        return mb

    def shares(self) -> dict[str, float]:
        total = max(1, sum(self.source_counts))
        return {name: n / total for name, n in zip(self.mixture.names, self.source_counts)}

    def close(self) -> None:
        self._it = None  # shuts the workers down
