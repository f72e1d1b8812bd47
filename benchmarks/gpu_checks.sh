#!/usr/bin/env bash
# The GPU checks of issues 6 and 8 in one short run, for a session that is lent a device for a few
# minutes: environment, bf16 training step vs HF, and generation (eager, compiled / CUDA graphs)
# vs HF default and HF static-cache compiled generate. Results go to $OUT (or ./gpu-results).
#
#   bash benchmarks/gpu_checks.sh            # on the device machine, from the repository root
#
# Each step has its own time limit so that one slow compile cannot eat the whole budget.
#
# The device image has torch, transformers, accelerate, typer, tqdm, pyarrow and matplotlib, but not
# pydantic or omegaconf: carry them as wheels (see the device tool's README), e.g. here
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic pydantic-core annotated-types typing-inspection omegaconf antlr4-python3-runtime
# and start the device command with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site;
set -u
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

step env 60 "$PY" -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name(0))"
step train_step 150 "$PY" benchmarks/train_step.py --preset gpu --device cuda --json
step generate 330 "$PY" benchmarks/generate_speed.py --shape smolvlm-360m --device cuda --dtype bfloat16 \
    --text-tokens 32 --repeats 3 --compiled --hf-compiled --json "$OUT/generate.jsonl"

# ---- LoRA step: vlmkit vs transformers + peft on imported Qwen2-VL and LLaVA-NeXT (benchmarks/lora_step.py)
# Reads `--device DEV` (default cuda) and `--quick` from the script's arguments itself, so that
#   bash benchmarks/gpu_checks.sh --device cpu --quick
# runs it on a CPU in well under a minute. It needs peft on the device (carry its wheel like the others).
lora_device=cuda lora_quick=0 lora_prev=
for lora_arg in "$@"; do
    [ "$lora_prev" = --device ] && lora_device=$lora_arg
    [ "$lora_arg" = --quick ] && lora_quick=1
    lora_prev=$lora_arg
done
if [ "$lora_quick" = 1 ]; then
    step lora_step 300 "$PY" benchmarks/lora_step.py --device "$lora_device" --batch 2 --repeats 1 --families qwen2-vl \
        --json "$OUT/lora_step.jsonl"
else
    step lora_step 240 "$PY" benchmarks/lora_step.py --device "$lora_device" --repeats 7 --json "$OUT/lora_step.jsonl"
fi
