#!/bin/bash
# Issue 8's GPU figures, one command each, as the device session of 2026-11-23 ran them
# (bench/NOTES.md holds what they printed). Run from the repository root on the GPU machine:
#
#   bash bench/gpu_runs.sh visual          # CLIP ViT-L/14-336: eager HF vs aoti variants, b1/b8   (~270 s)
#   bash bench/gpu_runs.sh llm             # LLaMA-7B decode fp16/W8A16/W4A16 vs eager HF + roofline (~480 s)
#   bash bench/gpu_runs.sh llava-gptfast   # LLaVA-1.5-7B pipeline vs eager HF; fp16 engine vs gpt-fast (~470 s)
#
# Results (JSON, written as they come) go to $OUT (default: .). gpt-fast is not part of this
# repository: GPTFAST=DIR names a checkout of github.com/pytorch-labs/gpt-fast (default ./gptfast).
# The device image has no pydantic (enginefarm.spec needs it): install it first where missing.
set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# AOTInductor packages compiled on that image crash at load (its compiler's libstdc++ code mixes with
# the process's) unless the system libstdc++ is preloaded: seen 2026-11-23, bench/toolchain_probe.sh
export LD_PRELOAD=${ENGINEFARM_LIBSTDCXX:-/usr/lib/x86_64-linux-gnu/libstdc++.so.6}
OUT=${OUT:-.}
GPTFAST=${GPTFAST:-gptfast}
case "$1" in
visual)
  python3 bench/gpu_visual.py --out "$OUT" --variants default,graphs,cudnn,tuned --deadline 300 ;;
llm)
  python3 bench/gpu_llm.py --out "$OUT" --layers 32 --new-tokens 128 --batches 1,8 --no-prefill --parallel 3 \
    --child-timeout 320 ;;
llava-gptfast)
  T0=$(date +%s)
  # the fp16 decode package for the gpt-fast comparison compiles beside the LLaVA compiles
  W=$(mktemp -d); mkdir -p "$W/none"
  python3 bench/gpu_llm.py --child none decode "$W/none" 32 \
    '{"max_batch_size": 1, "max_input_len": 64, "max_seq_len": 256}' > "$W/child.log" 2>&1 &
  python3 bench/gpu_llava.py --out "$OUT" --batches 1,4 --new-tokens 64 --child-timeout 300 \
    --wait-for "$W/none/engine.decode.json" --wait-max 90 2>&1 | grep -v "not aligned at run time"
  wait
  echo "llava done at $(( $(date +%s) - T0 ))s"
  python3 bench/gpu_gptfast.py --out "$OUT" --gptfast "$GPTFAST" --prebuilt "$W" --samples 3 --new-tokens 200 \
    --prompt-len 16 2>&1 | grep -v "not aligned at run time\|bpe_model_trainer\|trainer_interface" ;;
*)
  echo "usage: bash bench/gpu_runs.sh visual|llm|llava-gptfast" >&2; exit 2 ;;
esac
