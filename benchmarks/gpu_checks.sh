#!/usr/bin/env bash
# Every GPU comparison in one short run, for a machine lent for a few minutes: environment, bf16
# training step vs HF, generation (eager, compiled / CUDA graphs) vs HF default and HF static-cache
# compiled generate, then (also on the CPU with --device cpu) imported-model generation and eval,
# the LoRA step vs peft, the server's batching and caches, and int8. Results go to $OUT (or ./gpu-results).
#
#   bash benchmarks/gpu_checks.sh            # on the device machine, from the repository root
#
# Each step has its own time limit so that one slow compile cannot eat the whole budget; together
# they stay under 10 minutes (one device call).
#
# The device image has torch, transformers, accelerate, typer, tqdm, pyarrow and matplotlib, but not
# pydantic or omegaconf: carry them as wheels (see the device tool's README), e.g. here
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic pydantic-core annotated-types typing-inspection omegaconf antlr4-python3-runtime
# and start the device command with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
#
#   bash benchmarks/gpu_checks.sh --device cpu --quick   # the same steps as a CPU smoke run
set -u
DEVICE=cuda QUICK=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=$2; shift 2 ;;
        --quick) QUICK=--quick; shift ;;  # tiny random models: a smoke run of every step (tested on the CPU)
        *) echo "unknown argument: $1 (use --device DEV, --quick)" >&2; exit 2 ;;
    esac
done
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"  # vlmkit from the working tree, no install
PY="${PY:-python3}"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - t0))s"
    tail -n 12 "$OUT/$name.log"
}

if [ "$DEVICE" = cuda ]; then
step env 30 "$PY" -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))"
step train_step 90 "$PY" benchmarks/train_step.py --preset gpu --device cuda --json
step generate 120 "$PY" benchmarks/generate_speed.py --shape smolvlm-360m --device cuda --dtype bfloat16 \
    --text-tokens 32 --repeats 3 --compiled --hf-compiled --json "$OUT/generate.jsonl"
fi

# -- Where users wait: generation of imported models (Qwen2-VL, LLaVA-NeXT; batch 1 and 8) and
# `vlmkit eval run` through the vlmkit backend against the hf: backend on one exported folder,
# batched and one by one; outputs and answers asserted equal (the step fails otherwise).
step wait_generate_eval 90 "$PY" benchmarks/generate_speed.py --imported qwen2-vl,llava-next --eval --device "$DEVICE" \
    --repeats 5 --threads 1 $QUICK --json "$OUT/wait_generate_eval.jsonl"

# ---- LoRA step: vlmkit vs transformers + peft on imported Qwen2-VL and LLaVA-NeXT (benchmarks/lora_step.py),
# loss and adapter gradients checked equal first. It needs peft on the device (carry its wheel like the others).
if [ -n "$QUICK" ]; then
    step lora_step 60 "$PY" benchmarks/lora_step.py --device "$DEVICE" --batch 2 --repeats 1 --families qwen2-vl \
        --json "$OUT/lora_step.jsonl"
else
    step lora_step 60 "$PY" benchmarks/lora_step.py --device "$DEVICE" --repeats 7 --json "$OUT/lora_step.jsonl"
fi

# ---- the server: continuous batching + feature/prefix caches vs the static server, and int8 ----
# 32 openai-client users, 4 images, 3 questions each, both servers in one run (serve_load.py);
# int8 weight-only vs full precision: memory, batch-1 decoding, answer agreement (serve_int8.py).
SERVE_SHAPE=smollm2-135m
[ -n "$QUICK" ] && SERVE_SHAPE=tiny
step serve_load 120 "$PY" benchmarks/serve_load.py --device "$DEVICE" --shape "$SERVE_SHAPE" --repeats 1 $QUICK \
    --json "$OUT/serve_load.jsonl"
step serve_int8 90 "$PY" benchmarks/serve_int8.py --device "$DEVICE" --shape "$SERVE_SHAPE" --items 32 --repeats 1 $QUICK \
    --json "$OUT/serve_int8.jsonl"
