"""Generation speed: vlmkit `generate` against Hugging Face `generate`, same model, greedy.

The vlmkit model is exported in memory to `LlavaForConditionalGeneration` (vlmkit.families.llava.hf), so
both sides run identical weights on identical inputs (token ids + pixels, left-padded batches).
Each side is timed end to end (vision tower, prefill and decode) and reports new tokens per
second; their greedy outputs are compared token by token. Random weights: speed does not depend
on what the weights are.

    python benchmarks/generate_speed.py                      # CPU shapes, batch 1 and 32
    python benchmarks/generate_speed.py --shape smolvlm-360m --device cuda --dtype bfloat16 --compiled --hf-compiled

Side by side in one run (`--imported`): generation of imported Qwen2-VL / LLaVA-NeXT folders
(vlmkit `generate` vs transformers `generate`, batch 1 and 8, the same stop tokens, outputs
asserted equal) and `vlmkit eval run` with `-m vlmkit:CKPT` against `-m hf:FOLDER` on one
exported folder (same items, answers asserted equal), batched and one by one. Each figure is
the median of `--repeats` interleaved runs, in wall and process CPU seconds (CPU seconds move
much less with the load of a shared machine):

    python benchmarks/generate_speed.py --imported qwen2-vl,llava-next --eval --threads 1 --repeats 5
    python benchmarks/generate_speed.py --imported qwen2-vl --eval --quick          # a smoke run

Shapes: "cpu-small" (a small LM that a laptop CPU runs at batch 32 in seconds), "smollm2-135m" and
"smolvlm-360m" (SigLIP-B/16 at 384 px = 576 image tokens, SmolLM2-360M: the GPU comparison
of the issue; prompt 576 + 32 text tokens = 608).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

SHAPES = {
    "cpu-small": {
        "vision": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 64, "patch_size": 8},
        "llm": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048},
        "vocab": 8192,
    },
    "smollm2-135m": {
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 224, "patch_size": 16},
        "llm": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192, "tie_word_embeddings": True},
        "vocab": 49152,
    },
    "smolvlm-360m": {
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 384, "patch_size": 16},
        "llm": {"hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5, "max_position_embeddings": 8192, "tie_word_embeddings": True},
        "vocab": 49152,
    },
}


def build(shape: str, seed: int = 0):
    from vlmkit.config import load_config
    from vlmkit.model.vlm import VisionLanguageModel

    spec = SHAPES[shape]
    torch.manual_seed(seed)
    size = spec["vision"]["image_size"]
    cfg = load_config({"model": {
        "vision": {"name": "hf-random", "model_type": "siglip_vision_model", "config": spec["vision"]},
        "llm": {"name": "hf-random", "config": spec["llm"]},
        "processor": {"image_size": size, "mean": [0.5] * 3, "std": [0.5] * 3},
    }})
    model = VisionLanguageModel.build(cfg.model, pretrained=False)
    _grow_vocab(model, spec["vocab"])
    with torch.no_grad():
        # Sharper logits than random init, so greedy paths are not decided by float noise.
        model.llm.get_output_embeddings().weight.mul_(4)
    return model.eval()


def _grow_vocab(model, vocab: int) -> None:
    """Real LM heads are large (49k rows for SmolLM2); the byte-level test tokenizer is not.
    Extra rows cost what they cost in a real model; the benchmark never decodes text."""
    llm = model.llm
    if llm.get_input_embeddings().num_embeddings < vocab:
        llm.resize_token_embeddings(vocab)
        model.vocab_size = vocab
        # The image token must stay outside the LM's vocabulary range it indexes.


def prompts_for(model, batch: int, text_tokens: int, seed: int):
    from vlmkit.processing.base import VisualBatch
    from vlmkit.processing.prompt import EncodedSample

    g = torch.Generator().manual_seed(seed)
    size = model.config.processor.image_size
    out = []
    for i in range(batch):
        # Different lengths per row, so batches really are left-padded.
        n_text = max(4, text_tokens - (i % 5))
        text = torch.randint(0, 250, (n_text,), generator=g)
        ids = torch.cat([torch.full((model.tokens_per_image,), model.image_token_id), text])
        pixels = torch.randn(1, 3, size, size, generator=g)
        out.append(EncodedSample(f"p{i}", ids, torch.full_like(ids, -100), images=list(VisualBatch.of_pixels(pixels).images)))
    return out


def left_pad(prompts, pad_id: int):
    T = max(len(p.input_ids) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p.input_ids):] = p.input_ids
        mask[i, T - len(p.input_ids):] = 1
    return ids, mask, torch.cat([p.images[0].pixel_values for p in prompts])


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return result, statistics.median(times)


# Imported models at the lecture's small CPU shapes (`--imported`): tiny-but-not-trivial random
# folders saved with `save_pretrained` by the tests' folder builders, then `vlmkit import-hf`.
IMPORTED = {
    "qwen2-vl": {"text": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8,
                          "num_key_value_heads": 4,
                          "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}},
                 "vision": {"depth": 4, "embed_dim": 128, "num_heads": 4, "mlp_ratio": 4, "patch_size": 14}},
    "llava-next": {"text": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 8,
                            "num_key_value_heads": 4},
                   "vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}},
}


def imported_pair(family: str, root):
    """(vlmkit model, transformers model) of one random folder: the vlmkit one imported from it."""
    from pathlib import Path

    tests = Path(__file__).resolve().parent.parent / "tests"
    sys.path[:0] = [str(tests), str(tests / "families" / "llava_next"), str(tests / "families" / "qwen2_vl")]
    from vlmkit.checkpoint import load_checkpoint
    from vlmkit.hf.registry import import_hf

    shape = IMPORTED[family]
    if family == "qwen2-vl":
        from qwen2_vl_folder import save_qwen2vl
        from transformers import Qwen2VLForConditionalGeneration as cls

        # 224x168 px -> 16x12 patches of 14 px -> 48 visual tokens after the 2x2 merge.
        folder = save_qwen2vl(root / "hf", text=shape["text"], vision=shape["vision"], min_pixels=56 * 56, max_pixels=224 * 224)
    else:
        from llava_next_folder import save_llava_next
        from transformers import LlavaNextForConditionalGeneration as cls

        folder = save_llava_next(root / "hf", text=shape["text"], vision=shape["vision"], tile=112, patch=14)
    model, _ = load_checkpoint(import_hf(folder, root / "vlmkit"))
    return model.eval(), cls.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()


QUESTIONS = ["Describe this picture in detail.", "What is in the image?", "Which colours do you see, and where are they?",
             "Is there any text?", "Count the shapes.", "What stands out most, and why?", "Describe it.", "Any people?"]


def imported_prompts(model, batch: int):
    """One 224x168 noise image and a question per row; questions of different lengths, so a
    batch is left-padded."""
    from PIL import Image

    from vlmkit.data.formats import Message
    from vlmkit.processing import build_chat_processor

    chat = build_chat_processor(model, 8192)
    out = []
    for i in range(batch):
        g = torch.Generator().manual_seed(i)
        image = Image.fromarray((torch.rand(168, 224, 3, generator=g) * 255).byte().numpy())
        out.append(chat.encode_prompt([Message("user", "<image>\n" + QUESTIONS[i % len(QUESTIONS)])], [image]))
    return out


def imported_inputs(family: str, model, prompts) -> dict:
    """transformers' inputs for the same prompts, left-padded as its `generate` expects."""
    from vlmkit.families.llava_next.hf import llava_next_inputs

    T = max(len(p.input_ids) for p in prompts)
    pad = model.tokenizer.pad_token_id
    ids = torch.stack([torch.cat([torch.full((T - len(p.input_ids),), pad), p.input_ids]) for p in prompts])
    mask = (torch.arange(T)[None] >= torch.tensor([T - len(p.input_ids) for p in prompts])[:, None]).long()
    if family == "llava-next":
        extra = {k: v for k, v in llava_next_inputs(prompts, pad).items() if k in ("pixel_values", "image_sizes")}
    else:
        extra = {"pixel_values": torch.cat([p.images[0].pixel_values for p in prompts]),
                 "image_grid_thw": torch.tensor([p.images[0].views[0].grid for p in prompts]),
                 "mm_token_type_ids": (ids == model.image_token_id).int()}
    return {"input_ids": ids, "attention_mask": mask, **extra}


def _timed(fn, device: str) -> tuple[object, float, float]:
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def compare_generation(family: str, model, ref, batch: int, new_tokens: int, repeats: int, device: str = "cpu") -> dict:
    """vlmkit's `generate` against transformers' greedy `generate`, `repeats` runs each,
    interleaved, stopping at the same stop tokens on both sides; medians of wall and process CPU
    seconds, and whether every run gave transformers' tokens."""
    from vlmkit.generate import GenerationConfig, extra_stop_ids, generate

    prompts = imported_prompts(model, batch)
    inputs = {k: v.to(device) for k, v in imported_inputs(family, model, prompts).items()}
    tok = model.tokenizer
    stops = sorted({tok.eos_token_id, *extra_stop_ids(tok)})
    cfg = GenerationConfig(max_new_tokens=new_tokens)

    def ours():
        return generate(model, prompts, cfg)

    def theirs():
        with torch.inference_mode():
            out = ref.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=tok.pad_token_id)
        return _strip(out[:, inputs["input_ids"].shape[1]:].tolist(), stops)

    ours(), theirs()  # warm-up
    runs = {"vlmkit": ([], []), "hf": ([], [])}
    same = True
    for _ in range(repeats):
        mine, *t_mine = _timed(ours, device)
        their, *t_their = _timed(theirs, device)
        same = same and mine == their
        for name, (wall, cpu) in (("vlmkit", t_mine), ("hf", t_their)):
            runs[name][0].append(wall)
            runs[name][1].append(cpu)
    med = {k: (statistics.median(w), statistics.median(c)) for k, (w, c) in runs.items()}
    return {"what": "generate", "family": family, "batch": batch, "new_tokens": sum(map(len, mine)), "repeats": repeats,
            "vlmkit_s": med["vlmkit"][0], "vlmkit_cpu_s": med["vlmkit"][1], "hf_s": med["hf"][0], "hf_cpu_s": med["hf"][1],
            "ratio": med["hf"][0] / med["vlmkit"][0], "ratio_cpu": med["hf"][1] / med["vlmkit"][1], "same_outputs": same}


def cpu_flags() -> str:
    """The CPU features that decide fp32/bf16 kernel speed (`lscpu`'s flags), for the report."""
    from pathlib import Path

    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    return " ".join(sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})) or "none of avx2/avx512"


def side_by_side(args) -> int:
    """Generation of imported models and evaluation through both backends, in one run."""
    import platform
    import tempfile
    from pathlib import Path

    repeats, new_tokens, items = (2, 8, 8) if args.quick else (args.repeats, args.new_tokens, 32)
    device = args.device
    print(f"{platform.machine()} {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), {device}; "
          f"medians of {repeats} interleaved repeats", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in [f for f in (args.imported or "").split(",") if f]:
            model, ref = imported_pair(family, Path(tmp) / family)
            model.to(device)
            ref.to(device)
            for batch in (1, 8):
                rows.append(compare_generation(family, model, ref, batch, new_tokens, repeats, device))
                print(json.dumps(rows[-1]), flush=True)
            del model, ref
        if args.eval:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from eval_batching import compare_backends

            for row in compare_backends(Path(tmp) / "eval", n=items, repeats=repeats, device=device):
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print("\n| measure | batch | vlmkit s (CPU s) | transformers s (CPU s) | ratio (CPU) | same outputs |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        what = f"generate {r['family']}" if r["what"] == "generate" else f"eval {r['benchmark']} ({r['items']} items)"
        same = r.get("same_outputs", r.get("same_answers"))
        print(f"| {what} | {r['batch']} | {r['vlmkit_s']:.3f} ({r['vlmkit_cpu_s']:.3f}) | {r['hf_s']:.3f} ({r['hf_cpu_s']:.3f}) "
              f"| {r['ratio']:.2f}x ({r['ratio_cpu']:.2f}x) | {same} |")
    for r in rows:
        if r["what"] == "eval" and r["batch"] > 1:
            print(f"eval batched (b{r['batch']}) vs one by one: vlmkit {r['vlmkit_vs_one_by_one']:.2f}x, "
                  f"hf {r['hf_vs_one_by_one']:.2f}x")
    return 0 if all(r.get("same_outputs", r.get("same_answers")) for r in rows) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu-small")
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--text-tokens", type=int, default=32, help="text tokens after the image tokens")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--hf-compiled", action="store_true", help="also time HF generate with a static cache + torch.compile")
    ap.add_argument("--compiled", action="store_true",
                    help="also time vlmkit with its compiled decode step (GenerationConfig.compile; a CUDA graph on GPUs)")
    ap.add_argument("--json", help="append results as JSON lines to this file")
    ap.add_argument("--imported", help="side by side: comma-separated imported families (qwen2-vl, llava-next)")
    ap.add_argument("--eval", action="store_true", help="side by side: also the vlmkit eval backend against the hf: backend")
    ap.add_argument("--quick", action="store_true", help="side by side: 2 repeats, 8 new tokens, 8 eval items (a smoke run)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.imported or args.eval:
        return side_by_side(args)

    from vlmkit.families.llava.hf import to_llava
    from vlmkit.generate import GenerationConfig, extra_stop_ids, generate

    dtype = getattr(torch, args.dtype)
    model = build(args.shape)
    llava, _ = to_llava(model)
    model.to(args.device, dtype)
    llava.to(args.device, dtype).eval()
    tok = model.tokenizer
    pad_id = tok.pad_token_id
    stops = sorted({tok.eos_token_id, *extra_stop_ids(tok)})
    print(f"shape {args.shape}: {model.tokens_per_image} image tokens + ~{args.text_tokens} text tokens, "
          f"{args.new_tokens} new tokens, {args.dtype} on {args.device} ({torch.get_num_threads()} threads)", flush=True)

    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        prompts = prompts_for(model, batch, args.text_tokens, seed=batch)
        ids, mask, pixels = left_pad(prompts, pad_id)
        ids, mask, pixels = ids.to(args.device), mask.to(args.device), pixels.to(args.device, dtype)
        gen_cfg = GenerationConfig(max_new_tokens=args.new_tokens)

        def ours():
            return generate(model, prompts, gen_cfg)

        def hf_default():
            with torch.inference_mode():
                out = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=args.new_tokens,
                                     do_sample=False, eos_token_id=stops, pad_token_id=pad_id)
            return _strip(out[:, ids.shape[1]:].tolist(), stops)

        ours()  # warm-up (allocator, kernels)
        hf_default()
        mine, t_mine = timed(ours, args.device, args.repeats)
        theirs, t_hf = timed(hf_default, args.device, args.repeats)
        n_mine, n_hf = sum(map(len, mine)), sum(map(len, theirs))
        same = sum(a == b for a, b in zip(mine, theirs))
        row = {"shape": args.shape, "batch": batch, "device": args.device, "dtype": args.dtype, "threads": torch.get_num_threads(),
               "prompt_tokens": int(mask.sum(1).max()), "new_tokens": args.new_tokens,
               "vlmkit_tok_s": n_mine / t_mine, "hf_default_tok_s": n_hf / t_hf, "ratio_vs_default": (n_mine / t_mine) / (n_hf / t_hf),
               "same_greedy_rows": f"{same}/{batch}"}
        if args.compiled:
            compiled_cfg = GenerationConfig(max_new_tokens=args.new_tokens, compile=True)
            t0 = time.perf_counter()
            generate(model, prompts, compiled_cfg)  # compiles
            row["vlmkit_compile_s"] = time.perf_counter() - t0
            generate(model, prompts, compiled_cfg)
            ours_c, t_oc = timed(lambda: generate(model, prompts, compiled_cfg), args.device, args.repeats)
            row["vlmkit_compiled_tok_s"] = sum(map(len, ours_c)) / t_oc
            row["vlmkit_compiled_same_rows"] = f"{sum(a == b for a, b in zip(ours_c, theirs))}/{batch}"
        if args.hf_compiled:
            def hf_compiled():
                with torch.inference_mode():
                    out = llava.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=args.new_tokens,
                                         do_sample=False, eos_token_id=stops, pad_token_id=pad_id, cache_implementation="static",
                                         compile_config=None)
                return _strip(out[:, ids.shape[1]:].tolist(), stops)

            llava.generation_config.cache_implementation = "static"
            hf_compiled()
            hf_compiled()
            compiled, t_c = timed(hf_compiled, args.device, args.repeats)
            llava.generation_config.cache_implementation = None
            row["hf_compiled_tok_s"] = sum(map(len, compiled)) / t_c
            row["ratio_vs_compiled"] = (n_mine / t_mine) / row["hf_compiled_tok_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    print("\n| batch | vlmkit new tok/s | HF default new tok/s | ratio | same greedy rows |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['vlmkit_tok_s']:,.0f} | {r['hf_default_tok_s']:,.0f} | {r['ratio_vs_default']:.2f}x | {r['same_greedy_rows']} |")
    for r in rows:
        extra = []
        if "vlmkit_compiled_tok_s" in r:
            extra.append(f"vlmkit compiled {r['vlmkit_compiled_tok_s']:,.0f} new tok/s ({r['vlmkit_compiled_same_rows']} rows equal HF,"
                         f" compiled in {r['vlmkit_compile_s']:.0f} s)")
        if "hf_compiled_tok_s" in r:
            extra.append(f"HF static-cache compiled {r['hf_compiled_tok_s']:,.0f} new tok/s")
        if extra:
            print(f"batch {r['batch']}: " + "; ".join(extra))
    return 0


def _strip(rows, stops):
    out = []
    for r in rows:
        cut = next((i for i, t in enumerate(r) if t in stops), len(r))
        out.append(r[:cut])
    return out


if __name__ == "__main__":
    sys.exit(main())
