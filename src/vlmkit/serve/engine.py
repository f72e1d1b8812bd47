"""Continuous batching: requests join the running batch between decoding steps and leave it the
step they finish.

One worker thread owns the model. Each step it first admits waiting requests (up to
`max_batch` rows): a new request's prompt is prefilled alone, reusing the longest cached prefix
of keys and values (`caches.PrefixCache`) and the cached visual tokens of its images
(`caches.FeatureCache`), and its first token is sent at once. Then one decoding step runs for
every row in the batch. A row that ends (a stop token, its limit, or a client that went away)
leaves immediately, and its slot goes to the next request.

The keys and values live in one tensor per layer, (rows, kv_heads, length, head_dim): row r holds
its own tokens from column 0, so rows of different lengths decode together under a per-row mask,
and the rows in use are always the first ones (a leaving row's slot takes the last row's data),
so attention reads plain slices. The layers run on `fast_decode`'s decode-layout weights (or on
the model's own linear modules, for quantized weights), in the same operation order as the
model, so each row's greedy answer equals what `generate` gives for it alone.

Each row samples with its own settings; a seeded request has its own generator, so its answer
does not depend on which requests it shared the batch with.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from vlmkit.generate import GenerationConfig, _pick, extra_stop_ids
from vlmkit.model import fast_decode
from vlmkit.serve.batching import Event, GenerationWorker, Job
from vlmkit.serve.caches import BLOCK, FeatureCache, PrefixCache, image_key

log = logging.getLogger("vlmkit.serve")


class _ModuleLinear:
    """The model's own linear modules side by side (q|k|v, gate|up), for weights `fast_decode`
    cannot copy into its layout (quantized tensors)."""

    def __init__(self, *modules: nn.Module):
        self.modules = modules

    def __call__(self, x):
        outs = [m(x) for m in self.modules]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def _module_weights(llm: nn.Module):
    """`fast_decode`'s per-layer view of the decoder, built on the model's modules (no copies)."""
    layers = []
    for layer in llm.base_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(fast_decode._Layer(
            fast_decode._Norm(layer.input_layernorm.weight.detach(), fast_decode._eps(layer.input_layernorm)),
            _ModuleLinear(attn.q_proj, attn.k_proj, attn.v_proj), _ModuleLinear(attn.o_proj),
            fast_decode._Norm(layer.post_attention_layernorm.weight.detach(), fast_decode._eps(layer.post_attention_layernorm)),
            _ModuleLinear(mlp.gate_proj, mlp.up_proj), _ModuleLinear(mlp.down_proj),
        ))
    norm = llm.base_model.norm
    return layers, fast_decode._Norm(norm.weight.detach(), fast_decode._eps(norm)), _ModuleLinear(llm.get_output_embeddings())


def supports(model) -> bool:
    """Whether the continuous engine can run this model: a causal Llama-family decoder that
    `fast_decode` reads, with images filled into text slots (prefix fusion)."""
    # M-RoPE decoders (Qwen2-VL) run on fast_decode's loop too, but a row's positions are three
    # per token and restart after its images, which this engine's shared position arithmetic does not do.
    return (model.attention_rule.name == "causal" and model.fusion.name == "prefix"
            and getattr(model, "position_rule", "1d") == "1d"
            and getattr(model.fusion, "levels", None) is None and _decoder_supported(model.llm))


def _decoder_supported(llm) -> bool:
    if fast_decode.supports(llm):
        return True
    # Quantized linears are not plain nn.Linear weights, but the layout is the same.
    cfg = llm.config
    return cfg.model_type in fast_decode.SUPPORTED_MODEL_TYPES and hasattr(llm.base_model, "layers")


@dataclass
class _Row:
    job: Job
    length: int  # tokens in the cache
    token: int = 0  # the token to feed next
    count: int = 0
    generator: torch.Generator | None = None
    finished: bool = False


@dataclass
class _Prompt:
    length: int
    keys: list[str]  # image keys
    digests: list[str]  # prefix digests at block boundaries
    reused: int  # tokens of the cached prefix
    prefix: list | None  # its per-layer (keys, values)


# Most padded prompt tokens prefilled in one pass (bounds the activations of a burst of requests).
PREFILL_TOKENS = 4096


def _groups(items: list, budget: int) -> list[list]:
    """Consecutive groups whose padded size (count x longest suffix) stays within `budget`."""
    groups, current, longest = [], [], 0
    for item in items:
        size = item[1].length - item[1].reused
        if current and (len(current) + 1) * max(longest, size) > budget:
            groups.append(current)
            current, longest = [], 0
        current.append(item)
        longest = max(longest, size)
    return groups + [current] if current else groups


@dataclass
class _Cache:
    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)


class ContinuousBatcher(GenerationWorker):
    """The server's generation worker with continuous batching (the module notes). Same interface
    as `batching.DynamicBatcher`."""

    def __init__(self, model, max_batch: int = 32, max_queue: int = 1024, bf16: bool = False,
                 feature_cache: FeatureCache | None = None, prefix_cache: PrefixCache | None = None):
        if not supports(model):
            raise ValueError("continuous batching needs a causal Llama-family decoder with prefix fusion; "
                             "use static batching for this model")
        self.model, self.max_batch, self.max_queue, self.bf16 = model, max_batch, max_queue, bf16
        self.feature_cache = feature_cache or FeatureCache(0, "")
        self.prefix_cache = prefix_cache or PrefixCache(0, "")
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.error: BaseException | None = None
        # "batches": runs of decoding started from an empty batch; "steps": decoding steps.
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "tokens": 0, "steps": 0, "prefix_tokens_reused": 0}
        self._rows: list[_Row] = []
        self._cache = _Cache()
        tok = model.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.stop_ids = {i for i in [tok.eos_token_id, *extra_stop_ids(tok)] if i is not None}

    def cache_stats(self) -> dict:
        return {"feature_cache": self.feature_cache.lru.stats(), "prefix_cache": self.prefix_cache.lru.stats()}

    # ---- worker ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._setup()
                while not self._stopping.is_set():
                    self._admit()
                    if self._rows:
                        self._step_guarded()
        except BaseException as e:  # the worker must never die silently: /health reports it
            log.exception("generation worker stopped")
            self.error = e
            for row in self._rows:
                row.job.emit(Event("error", reason="the generation worker stopped"))
            self._rows = []
        finally:
            for row in self._rows:  # stopped mid-answer: nobody will finish these
                row.job.emit(Event("error", reason="the server is shutting down"))
            self._rows = []
            self._refuse_queued()

    def _setup(self) -> None:
        llm = self.model.llm
        self.device = self.model.device
        # The cache keeps the embeddings' dtype, as `generate`'s decoder does (under bf16
        # autocast too).
        self.dtype = llm.get_input_embeddings().weight.dtype
        if fast_decode.supports(llm):
            w = fast_decode.decode_weights(llm)
            self.layers, self.final_norm, self.head = w.layers, w.final_norm, w.head
        else:
            self.layers, self.final_norm, self.head = _module_weights(llm)
        attn = llm.base_model.layers[0].self_attn
        self.dims = (llm.config.num_attention_heads, llm.config.num_key_value_heads, attn.head_dim)
        self.scaling = attn.scaling
        act = llm.base_model.layers[0].mlp.act_fn
        self.act = fast_decode._silu_ if isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" else act
        self.embed = llm.get_input_embeddings()
        self.rotary = llm.base_model.rotary_emb

    def _admit(self) -> None:
        """Take waiting requests into free rows (block only when nothing is decoding) and prefill
        them together, at most `PREFILL_TOKENS` padded prompt tokens per pass."""
        new: list[tuple[Job, _Prompt]] = []
        while len(self._rows) + len(new) < self.max_batch:
            try:
                job = self._queue.get() if not (self._rows or new) else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._stopping.set()
                break
            if job.cancelled:
                continue
            try:
                new.append((job, self._plan(job)))
            except Exception as e:
                log.exception("a prompt could not be prepared")
                job.emit(Event("error", reason=f"generation failed: {type(e).__name__}: {e}"))
        for group in _groups(new, PREFILL_TOKENS):
            try:
                with self._autocast():
                    self._prefill(group)
            except Exception as e:
                log.exception("prefill failed")
                for job, _ in group:
                    job.emit(Event("error", reason=f"generation failed: {type(e).__name__}: {e}"))

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _step_guarded(self) -> None:
        try:
            with self._autocast():
                self._step()
        except Exception as e:
            log.exception("decoding failed for a batch of %d", len(self._rows))
            for row in self._rows:
                row.job.emit(Event("error", reason=f"generation failed: {type(e).__name__}: {e}"))
            self._rows = []

    # ---- the cache ------------------------------------------------------------------------
    def _ensure_capacity(self, rows: int, length: int) -> None:
        """Grow the per-layer tensors (doubling) so `rows` rows of `length` positions fit."""
        c = self._cache
        have_rows, have_len = (c.keys[0].shape[0], c.keys[0].shape[2]) if c.keys else (0, 0)
        if rows <= have_rows and length <= have_len:
            return
        new_rows = max(have_rows, min(self.max_batch, max(rows, 2 * have_rows, 4)))
        new_len = max(have_len, length if length <= have_len else max(length, 2 * have_len, 256))
        _, kv_heads, head_dim = self.dims
        used = max((r.length for r in self._rows), default=0)

        # Attention multiplies a row's masked columns by a zero probability, and 0 * NaN from
        # uninitialised memory is NaN: the cache starts zeroed, and every later write is finite.
        def grow(old):
            t = torch.zeros((new_rows, kv_heads, new_len, head_dim), dtype=self.dtype, device=self.device)
            if old is not None and self._rows:
                t[: len(self._rows), :, :used] = old[: len(self._rows), :, :used]
            return t

        c.keys = [grow(c.keys[i] if c.keys else None) for i in range(len(self.layers))]
        c.values = [grow(c.values[i] if c.values else None) for i in range(len(self.layers))]

    def _rope(self, positions: torch.Tensor):
        """cos and sign-folded sin for (B, T) positions, shaped (B, T, 1, head_dim)."""
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary(probe, position_ids=positions)
        return cos.unsqueeze(2), fast_decode._signed_sin(sin).unsqueeze(2)

    def _layers(self, x, positions, mask, store_kv, last: torch.Tensor | None = None):
        """Logits after the decoder layers at each row's `last` position (default: the final one)."""
        cos, signed_sin = self._rope(positions)
        for i, w in enumerate(self.layers):
            x = fast_decode._decoder_layer(x, i, w, cos, signed_sin, self.dims, self.scaling, self.act, mask, store_kv,
                                           first=i == 0)
        x = x[:, -1] if last is None else x[torch.arange(x.shape[0], device=x.device), last]
        return self.head(self.final_norm(x))

    # ---- new requests ---------------------------------------------------------------------
    def _plan(self, job: Job) -> _Prompt:
        """The prompt's image keys, prefix digests and longest cached prefix."""
        prompt = job.prompt
        if prompt.position_ids is not None:
            raise ValueError("M-RoPE prompts need static batching")
        ids = prompt.input_ids.tolist()
        hashing = self.feature_cache.enabled or self.prefix_cache.enabled
        keys = [image_key(im, self.feature_cache.weights) for im in prompt.images] if hashing else []
        # The last prompt token always runs: its logits give the first answer token.
        digests = self.prefix_cache.boundaries(ids[:-1], self._slot_starts(prompt), keys) if self.prefix_cache.enabled else []
        reused, prefix = self.prefix_cache.lookup(digests)
        return _Prompt(len(ids), keys, digests, reused, prefix)

    def _prefill(self, group: list[tuple[Job, _Prompt]]) -> None:
        """Run the new prompts (after their cached prefixes) into new rows, side by side, and
        send their first tokens. Row i's suffix is right-padded to the longest: the padded tail
        writes columns past the row's length, which stay masked until decoding overwrites them."""
        r0, n = len(self._rows), len(group)
        suffix = max(p.length - p.reused for _, p in group)
        self.stats["batches"] += r0 == 0
        self._ensure_capacity(r0 + n, max(max(p.reused + suffix, p.length + job.max_new_tokens) for job, p in group))
        c = self._cache
        embeds = []
        for k, (job, p) in enumerate(group):
            if p.prefix is not None:
                for i, (keys, values) in enumerate(p.prefix):
                    c.keys[i][r0 + k, :, : p.reused] = keys
                    c.values[i][r0 + k, :, : p.reused] = values
                self.stats["prefix_tokens_reused"] += p.reused
            e = self._prompt_embeds(job.prompt, p.keys, p.reused)
            embeds.append(torch.nn.functional.pad(e, (0, 0, 0, suffix - e.shape[1])))
        starts = torch.tensor([p.reused for _, p in group], device=self.device)
        positions = starts[:, None] + torch.arange(suffix, device=self.device)[None]  # (n, S)
        end = int(positions.max()) + 1
        mask = (torch.arange(end, device=self.device)[None, None] <= positions[:, :, None])[:, None]  # (n, 1, S, end)
        rows = torch.arange(r0, r0 + n, device=self.device)[:, None]

        def store_kv(i, k, v):
            c.keys[i][rows, :, positions] = k.transpose(1, 2)
            c.values[i][rows, :, positions] = v.transpose(1, 2)
            return c.keys[i][r0 : r0 + n, :, :end], c.values[i][r0 : r0 + n, :, :end]

        last = torch.tensor([p.length - p.reused - 1 for _, p in group], device=self.device)
        logits = self._layers(torch.cat(embeds), positions, mask, store_kv, last)
        for k, (job, p) in enumerate(group):
            stored = len(p.digests) * BLOCK
            if stored > p.reused:
                r = r0 + k
                self.prefix_cache.store(p.digests, [(c.keys[i][r, :, :stored].clone(), c.values[i][r, :, :stored].clone())
                                                    for i in range(len(self.layers))])
            row = _Row(job, length=p.length)
            if job.gen.do_sample and job.gen.seed is not None:
                row.generator = torch.Generator(device=self.device).manual_seed(job.gen.seed)
            self._rows.append(row)
            self._take(row, int(_pick(logits[k : k + 1], job.gen, row.generator)[0]))
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(self._rows))
        self._leave([i for i, row in enumerate(self._rows) if row.finished])

    def _slot_starts(self, prompt) -> list[int]:
        """Where each image's first slot stands in the prompt."""
        slots = self.model.slot_mask(prompt.input_ids).nonzero().flatten().tolist()
        starts, at = [], 0
        for im in prompt.images:
            starts.append(slots[at] if at < len(slots) else len(prompt.input_ids))
            at += self.model.image_slots(im)
        return starts

    def _prompt_embeds(self, prompt, keys: list[str], reused: int) -> torch.Tensor:
        """(1, T - reused, D): the prompt's embeddings after its cached prefix, images fused in."""
        ids = prompt.input_ids.to(self.device)[None]
        rest = ids[:, reused:]
        # Markers (a connector's own tokens) are embedded only in a call with images.
        text_only = not bool(self.model.slot_mask(rest).any()) and not (self.model.marker_ids and prompt.images)
        if not prompt.images or text_only:
            return self.model.fill_slots(rest, None)
        tokens = self.feature_cache.image_tokens(self.model, list(prompt.images), keys)
        embeds = self.model.fusion.inputs_embeds(self.model, ids, tokens, cached=False, images=list(prompt.images))
        return embeds[:, reused:]

    # ---- decoding -------------------------------------------------------------------------
    def _take(self, row: _Row, token: int) -> None:
        """Record the token a row picked: send it, or end the row."""
        job = row.job
        if token in self.stop_ids:
            row.finished = True
            job.emit(Event("done", reason="stop"))
            return
        self.stats["tokens"] += 1
        row.count += 1
        row.token = token
        job.emit(Event("token", token=token))
        if row.count >= job.max_new_tokens:
            row.finished = True
            job.emit(Event("done", reason="length"))

    def _step(self) -> None:
        """One token for every row; rows that end leave at once."""
        for i, row in enumerate(self._rows):
            if row.job.cancelled and not row.finished:
                row.finished = True
                row.job.emit(Event("done", reason="cancelled"))
        self._leave([i for i, row in enumerate(self._rows) if row.finished])
        if not self._rows:
            return
        self.stats["steps"] += 1
        n = len(self._rows)
        lengths = torch.tensor([row.length for row in self._rows], device=self.device)
        end = int(lengths.max()) + 1
        self._ensure_capacity(n, end)
        c, rows = self._cache, torch.arange(n, device=self.device)
        mask = (torch.arange(end, device=self.device)[None] <= lengths[:, None])[:, None, None]

        def store_kv(i, k, v):
            c.keys[i][rows, :, lengths] = k[:, :, 0]
            c.values[i][rows, :, lengths] = v[:, :, 0]
            return c.keys[i][:n, :, :end], c.values[i][:n, :, :end]

        tokens = torch.tensor([row.token for row in self._rows], device=self.device)
        logits = self._layers(self.embed(tokens)[:, None], lengths[:, None], mask, store_kv)
        picked = self._pick_rows(logits)
        for row, token in zip(self._rows, picked):
            row.length += 1
            self._take(row, token)
        self._leave([i for i, row in enumerate(self._rows) if row.finished])

    def _pick_rows(self, logits: torch.Tensor) -> list[int]:
        """Greedy rows in one argmax; sampled rows one by one, each with its own settings."""
        picked = logits.argmax(-1).tolist()
        for i, row in enumerate(self._rows):
            if row.job.gen.do_sample:
                picked[i] = int(_pick(logits[i : i + 1], row.job.gen, row.generator)[0])
        return picked

    def _leave(self, indices: list[int]) -> None:
        """Drop rows; the last rows move into the freed slots, so rows in use stay first."""
        c = self._cache
        for i in sorted(indices, reverse=True):
            last = len(self._rows) - 1
            if i != last:
                moved = self._rows[last]
                for t in (*c.keys, *c.values):
                    t[i, :, : moved.length] = t[last, :, : moved.length]
                self._rows[i] = moved
            self._rows.pop()


__all__ = ["ContinuousBatcher", "GenerationConfig", "supports"]
