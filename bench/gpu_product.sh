#!/bin/bash
# The product's own path on a GPU worker (issue 22): `enginefarm build` ->
# validate -> publish, then `enginefarm bench`, as a worker runs them: no
# LD_PRELOAD, no environment tricks. Run from the repository root on the GPU
# machine (the device image has torch/transformers but not prefect: its wheel
# closure is installed first from .whl/ when present).
#
#   bash bench/gpu_product.sh tiny      # tiny llama, fp16 on sm_XY, aoti engine form + CUDA graphs (~3 min)
#   bash bench/gpu_product.sh llama7b   # LLaMA-7B-shaped (random fp16 weights written here), build + bench
#   bash bench/gpu_product.sh bench7b   # `enginefarm bench` of the llama7b build (same machine, after it)
#   bash bench/gpu_product.sh gptfast7b # gpt-fast on the same weights against bench7b's rows (after it)
#   bash bench/gpu_product.sh llava7b   # LLaVA-1.5-7B-shaped (CLIP ViT-L/14-336 + projector + LLaMA-7B, random
#                                       # fp16 weights written here): build (fp16; QUANTS="none w8a16" adds W8A16) + bench
#   bash bench/gpu_product.sh benchllava  # `enginefarm bench` of the llava7b build again (same machine, after it)
#   bash bench/gpu_product.sh all       # one GPU session's whole run, one thing at a time (BLOCKS="llava llama quant"
#                                       # picks and orders them): llava7b fp16 up to batch 8
#                                       # (static per-batch visual packages); llama7b fp16 (decode package tuned),
#                                       # bench7b, roofline7b (gptfast7b with GPTFAST_RUN=1); llama7b's W8A16 and W4A16
#                                       # variants, benched against fp16 (bench/quant_vs_fp16.py); BLOCKS="... clip" adds
#                                       # the visual engine alone (a 2-layer LLM) at batch 1 and 8; $OUT/all.done marks its end
#
# SRC_ROOT=DIR writes the random checkpoints there (default: the mode's work directory under /tmp). A 7B build
# keeps four copies of the weights on disk (source, fetched, converted, engine): `all` puts the sources in
# /dev/shm when it has room, so that a W8A16 engine and gpt-fast's checkpoint still fit a 64 GiB disk.
#
# Results (build JSON, bench JSON, timings) go to $OUT (default: .).
set -o pipefail
export PYTHONUNBUFFERED=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_HOME=$(mktemp -d)
OUT=${OUT:-.}
if [ -d /tmp/site ]; then
  # installed by an earlier mode on this machine (llava7b re-runs this for benchllava; `session`'s later calls
  # must not reinstall under the run they wait for)
  export PYTHONPATH=/tmp/site:$PWD
elif [ -d .whl ] && ! python3 -c "import prefect" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 2
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# SM=cpu DTYPE=float32 SHAPED_LAYERS=2 SHAPED_DEVICE=cpu SHAPED_DTYPE=float32: a dry run of a mode on a CPU machine
SM=${SM:-$(python3 -c "import torch; print('sm_%d%d' % torch.cuda.get_device_capability())")}
DTYPE=${DTYPE:-float16}
DV=$([ "$DTYPE" = float16 ] && echo fp16 || echo fp32)  # the default variant's dtype part
W=$(mktemp -d)
ef() { python3 -m enginefarm "$@"; }
# bench_table FILE: an `enginefarm bench --json` report as bench's own table (nothing where the bench wrote none)
bench_table() { [ -s "$1" ] && python3 -c "import json,sys; from enginefarm.benchmark import format_table; \
print(format_table(json.load(open(sys.argv[1]))))" "$1"; }
stamp() { echo "[$(date +%T)] $*"; }
# timed_build NAME RECIPE STORE [BUILD ARGS]: `enginefarm build` under /usr/bin/time -v with the GPU's memory sampled
# every 250 ms; prints wall time, peak host RSS, peak GPU memory and each step's own wall time; returns its rc
timed_build() {
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 > "$OUT/gpu_mem_$1.txt" &
  local smi=$!
  stamp build; /usr/bin/time -v python3 -m enginefarm build "$2" --store "$3" "${@:4}" --json \
    > "$OUT/$1_build.json" 2> "$OUT/$1_build.err"; local rc=$?; kill $smi
  grep "Maximum resident\|Elapsed" "$OUT/$1_build.err"; grep -o "[a-z]*\( \[[^]]*\]\)\?: done in [0-9.]*s.*\|failed: .*" "$OUT/$1_build.err"
  echo "peak GPU MiB: $(sort -n "$OUT/gpu_mem_$1.txt" | tail -1)"
  grep -o "validate \[[^]]*\]: greedy: .*" "$OUT/$1_build.err"  # the near-tie rule's verdict (gated or not)
  # the validate manifests (every metric) outlive the store, which a later step deletes
  mkdir -p "$OUT/$1_validate"; find "$3" -path "*manifests*/validate/*.json" -exec cp {} "$OUT/$1_validate/" \;
  stamp "build rc=$rc"; [ -s "$OUT/$1_build.json" ] && head -c 3000 "$OUT/$1_build.json"; echo
  return $rc
}
# llama_src: SRC, the LLaMA-7B-shaped checkpoint (random fp16 weights), written there unless it already is
llama_src() {
  SRC=${SRC_ROOT:-/tmp/ef7b}/src-llama
  [ -e "$SRC/config.json" ] || { stamp "write the checkpoint"; python3 -m bench.models llama "$SRC" || exit 1; }
}
case "$1" in
tiny)
  sed -e "s/^name: tiny-llama/name: gpu-tiny-llama/" -e "s/dtype: \[float32\]/dtype: [float16]/" \
      -e "s/target: \[cpu\]/target: [$SM]/" -e "s/^default_variant: .*/default_variant: fp16-tp1/" \
      -e "s/^  llm: {}/  llm: {aoti: {cuda_graphs: true}}/" \
      -e "s/logits_max_abs_diff: 0.001/logits_max_abs_diff: 0.05/" -e "s/greedy_equal: true/greedy_equal: false/" \
      -e "s/perplexity_rel_diff: 0.001/perplexity_rel_diff: 0.01/" -e "s/top5_accuracy_drop: 0.0/top5_accuracy_drop: 0.05/" \
      -e "s/top1_agreement: 0.99/top1_agreement: 0.9/" \
      models/tiny/tiny-llama.yaml > "$W/gpu-tiny-llama.yaml"
  stamp build; /usr/bin/time -v python3 -m enginefarm build "$W/gpu-tiny-llama.yaml" --store "$W/store" --json \
    > "$OUT/tiny_build.json" 2> "$OUT/tiny_build.err"; rc=$?; tail -25 "$OUT/tiny_build.err" | grep -v "^\s*\(Page\|Socket\|Signals\|Swaps\|File sys\|Average\|Exit\|Minor\|Major\|Voluntary\|Involuntary\|Percent\)"
  stamp "build rc=$rc"; head -c 1500 "$OUT/tiny_build.json"; echo
  stamp bench; ef bench gpu-tiny-llama --store "$W/store" --batch 1 --input-len 16 --output-len 32 --json \
    > "$OUT/tiny_bench.json" 2> "$OUT/tiny_bench.err"; echo "bench rc=$?"; tail -5 "$OUT/tiny_bench.err"; head -c 1500 "$OUT/tiny_bench.json"; echo ;;
llama7b)
  # QUANTS="none w8a16 w4a16" puts those variants in the recipe's matrix; VARIANTS="fp16-tp1 ..." builds those
  # alone (default: every variant) into STORE7B (default /tmp/ef7b/store), under the name NAME7B (default 7b)
  W=/tmp/ef7b; mkdir -p $W; llama_src
  Q=$(echo ${QUANTS:-none} | sed "s/ /, /g"); LAOTI=${LLM_AOTI:-{cuda_graphs: true\}}
  Y=$W/llama-7b-shaped.${NAME7B:-7b}.yaml  # one recipe file per build (`both` runs two at once)
  cat > "$Y" <<YAML
name: llama-7b-shaped
description: LLaMA-7B-shaped random fp16 weights (issue 22's GPU-worker run)
family: llama
source: {path: $SRC}
components:
  llm: {aoti: $LAOTI}
matrix: {backend: [aoti], dtype: [$DTYPE], quant: [$Q], tp: [1], target: [$SM]}
default_variant: $DV-tp1
limits: {max_batch_size: 1, max_input_len: 256, max_seq_len: 512}
validation:
  prompts: ["The build farm", "Engines are rebuilt every night when"]
  # 128 greedy tokens (NEW_TOKENS) against the fp32 reference: issue 19's near-tie rule (greedy_equal_to_near_tie, reported)
  max_new_tokens: ${NEW_TOKENS:-128}
  max_eval_tokens: 128
  gates: {logits_max_abs_diff: null, top1_agreement: 0.8, greedy_equal: false, perplexity_rel_diff: 0.05, top5_accuracy_drop: 0.2}
  # random weights give flat logits, whose top-1 a weight-only rounding flips more often than a trained model's
  # (the 1-layer dry run on a CPU: W4A16 top-1 0.19)
  quant_gates:
    w8a16: {logits_max_abs_diff: null, top1_agreement: 0.3, greedy_equal: false, perplexity_rel_diff: 0.2, top5_accuracy_drop: 0.4}
    w4a16: {logits_max_abs_diff: null, top1_agreement: 0.0, greedy_equal: false, perplexity_rel_diff: 0.5, top5_accuracy_drop: 0.6}
YAML
  python3 -c "import sys; from enginefarm.families import load_recipe; load_recipe(sys.argv[1])" "$Y" || exit 2
  timed_build ${NAME7B:-7b} "$Y" "${STORE7B:-$W/store}" $(for v in $VARIANTS; do echo --variant $v; done) ;;
bench7b)
  # VARIANT=fp16-w8a16-tp1 benches that variant (default: the recipe's default) of STORE7B, into $OUT/${NAME7B}_bench.json
  W=/tmp/ef7b; N=${NAME7B:-7b}
  stamp "bench ${VARIANT:-default}"; ef bench llama-7b-shaped${VARIANT:+:$VARIANT} --store "${STORE7B:-$W/store}" --batch 1 \
    --input-len ${INPUT_LENS:-16} --output-len 128 --iters 3 ${BENCH7B_EXTRA} --json > "$OUT/${N}_bench.json" \
    2> "$OUT/${N}_bench.err"; echo "bench rc=$?"; tail -5 "$OUT/${N}_bench.err"
  bench_table "$OUT/${N}_bench.json" ;;
gptfast7b)
  # gpt-fast (its sources in .gptfast/, fetched, never committed; sentencepiece and tiktoken wheels in .whl/) on
  # the llama7b ref's weights, against bench7b's `enginefarm bench` rows (same machine, after them)
  stamp gpt-fast; python3 bench/gptfast_vs_bench.py --src ${SRC_ROOT:-/tmp/ef7b}/src-llama --bench "$OUT/7b_bench.json" \
    --gptfast "${GPTFAST:-.gptfast}" --out "$OUT" ${GF_CKPT_DIR:+--ckpt-dir $GF_CKPT_DIR} ;;
roofline7b)
  # the bench7b rows' decode rate against the memory roofline (copy bandwidth measured in the same run)
  stamp roofline; python3 bench/decode_roofline.py --src ${SRC_ROOT:-/tmp/ef7b}/src-llama --bench "$OUT/7b_bench.json" \
    --out "$OUT" ;;
llava7b)
  W=${W_LLAVA:-/tmp/efllava}; mkdir -p $W; SRC=${SRC_ROOT:-$W}/src-llava
  stamp "write the checkpoint"
  python3 -m bench.models llava "$SRC" || exit 1
  Q=$(echo ${QUANTS:-none} | sed "s/ /, /g")
  Q1=$(echo ${QUANTS:-none} | cut -d" " -f1); DEFV=$DV$([ "$Q1" = none ] || echo "-$Q1")-tp1  # the first variant
  # MAX_BATCH: the limits' max_batch_size (the visual engine's too); VISUAL_AOTI / LLM_AOTI: the components' options
  MB=${MAX_BATCH:-1}; VAOTI=${VISUAL_AOTI:-{cuda_graphs: true\}}; LAOTI=${LLM_AOTI:-{cuda_graphs: true\}}
  LNAME=${LLAVA_NAME:-llava-7b-shaped}  # SHAPED_LLM_LAYERS=2 LLAVA_NAME=llava-clip-shaped: the whole CLIP, a 2-layer LLM
  cat > "$W/llava-7b-shaped.yaml" <<YAML
name: $LNAME
description: LLaVA-1.5-7B-shaped random fp16 weights (issue 22's GPU-worker run)
family: llava
source: {path: $SRC}
components:
  visual: {aoti: $VAOTI}
  llm: {aoti: $LAOTI}
matrix: {backend: [aoti], dtype: [$DTYPE], quant: [$Q], tp: [1], target: [$SM]}
default_variant: $DEFV
limits: {max_batch_size: $MB, max_input_len: 768, max_seq_len: 1024}
validation:
  prompts: ["USER: <image>\nWhat is in the picture? ASSISTANT:"]
  images: ["builtin:gradient", "builtin:rings"]
  max_new_tokens: 8
  max_eval_tokens: 128
  # random weights give flat logits (the W8A16 variant's top-1 was 0.800 in session 4)
  gates: {logits_max_abs_diff: null, top1_agreement: 0.5, greedy_equal: false, perplexity_rel_diff: 0.05, top5_accuracy_drop: 0.2, visual_max_abs_diff: 0.1}
  # random weights give flat logits, whose top-1 a weight-only rounding flips more often than a trained model's
  # (the 1-layer dry run on a CPU: W4A16 top-1 0.19)
  quant_gates:
    w8a16: {logits_max_abs_diff: null, top1_agreement: 0.5, greedy_equal: false, perplexity_rel_diff: 0.1, top5_accuracy_drop: 0.3, visual_max_abs_diff: 0.1}
YAML
  # the recipe checked against its family before the build (as `enginefarm build` does first)
  python3 -c "import sys; from enginefarm.families import load_recipe; load_recipe(sys.argv[1])" "$W/llava-7b-shaped.yaml" \
    || exit 2
  timed_build $LNAME "$W/llava-7b-shaped.yaml" "$W/store"  # a variant that failed is reported by its bench (rc 2)
  rc=$?; [ -n "$NO_BENCH" ] && exit $rc  # NO_BENCH=1: the build alone (`all` benches it later)
  exec bash "$0" benchllava ;;
benchllava)
  W=${W_LLAVA:-/tmp/efllava}; LNAME=$(sed -n "s/^name: //p" "$W/llava-7b-shaped.yaml")
  for v in $(python3 -c "
import sys; sys.path.insert(0, '.')
from enginefarm.families import load_recipe
print(' '.join(v.name for v in load_recipe('$W/llava-7b-shaped.yaml').variants()))"); do
    # prompt: BOS + the image's 576 placeholders + newline + random text: 18 text tokens, 594 positions, as
    # bench/NOTES.md (4) measured; BENCH_ARGS replaces the sweep
    stamp "bench $v"; ef bench "$LNAME:$v" --store "$W/store" ${BENCH_ARGS:---batch 1 --input-len 18 --output-len 64,128 --iters 5} \
      --json > "$OUT/${LNAME}_bench_$v.json" 2> "$OUT/${LNAME}_bench_$v.err"; echo "bench rc=$?"
    tail -5 "$OUT/${LNAME}_bench_$v.err"
    bench_table "$OUT/${LNAME}_bench_$v.json"
  done ;;
all)
  stamp "machine"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; df -h /tmp /dev/shm
  free -g | head -2
  shm=$(df -B1G --output=avail /dev/shm 2>/dev/null | tail -1 | tr -d ' ')
  if [ "${shm:-0}" -ge 40 ]; then export SRC_ROOT=/dev/shm/ef GF_CKPT_DIR=/dev/shm; mkdir -p $SRC_ROOT; fi
  echo "sources in ${SRC_ROOT:-/tmp}; gpt-fast's checkpoint in ${GF_CKPT_DIR:-/tmp}"
  # the convert step quantizes on the GPU here: its integers and scales must be the CPU's (pytest from .whl/)
  stamp "quantize on cuda vs the cpu"; python3 -m pytest -q -p no:cacheprovider tests/test_quant_tp.py -k on_cuda 2>&1 | tail -3
  # the 7B text engines' options: the decode package coordinate-descent tuned (its M = 1 products become tuned
  # reductions, as in gpt-fast; the prefill package untuned, as it was faster untuned), the same for fp16, W8A16 and
  # W4A16 (whose GEMV kernels it leaves alone, but not the rest of their decode step)
  LAOTI7B="${LLAMA_AOTI:-{cuda_graphs: true, coordinate_descent_tuning: decode\}}"; QAOTI7B="${QUANT_AOTI:-$LAOTI7B}"
  # the quantized variants' store (in /dev/shm where it has room); their greedy lines are not judged: 16 new
  # tokens, not 128, in their reference, shards and validate steps
  QSTORE=${SRC_ROOT:-/tmp/ef7b}/store7bq
  fp16_build() { QUANTS="none w8a16 w4a16" LLM_AOTI="$LAOTI7B" VARIANTS=$DV-tp1 NEW_TOKENS=${LLAMA_NEW_TOKENS:-128} \
    bash "$0" llama7b; }
  quant_build() { STORE7B=$QSTORE QUANTS="none w8a16 w4a16" LLM_AOTI="$QAOTI7B" VARIANTS="$DV-w8a16-tp1 $DV-w4a16-tp1" \
    NAME7B=7bq NEW_TOKENS=16 bash "$0" llama7b; }
  fp16_bench() { BENCH7B_EXTRA=--no-eager bash "$0" bench7b; }
  quant_benches() {
    for q in w8a16 w4a16; do STORE7B=$QSTORE VARIANT=$DV-$q-tp1 NAME7B=7b_$q BENCH7B_EXTRA=--no-eager bash "$0" bench7b; done
    stamp "quantized vs fp16"
    python3 bench/quant_vs_fp16.py --fp16 "$OUT/7b_bench.json" "$OUT/7b_w8a16_bench.json" "$OUT/7b_w4a16_bench.json" --out "$OUT"
  }
  # BLOCKS: which blocks run, in that order (default: llava llama quant; clip: the visual engine alone, with a
  # 2-layer language model; both: llama's and quant's builds side by side); quant sets its variants
  # against llama's fp16 rows, so it runs after llama in the same run
  for block in ${BLOCKS:-llava llama quant}; do
  case $block in
  llava)
      # LLaVA fp16 up to batch 8: CLIP ViT-L/14-336 (+ projector) alone at batch 1, 4 and 8 and the pipeline at
      # each, against eager HF. The visual engine is one static-shape package per batch size (static_batches)
      QUANTS="${LLAVA_QUANTS:-none}" MAX_BATCH=${LLAVA_MAX_BATCH:-8} NO_BENCH=1 \
        VISUAL_AOTI="${LLAVA_VISUAL_AOTI:-{cuda_graphs: true, static_batches: true\}}" bash "$0" llava7b
      # (benched whatever the build's rc: a variant that failed a gate is reported by its bench, rc 2)
      BENCH_ARGS="--batch 1,4,8 --input-len 18 --output-len 64 --iters 3" bash "$0" benchllava
      df -h /tmp /dev/shm; rm -rf /tmp/efllava ${SRC_ROOT:-/tmp/efllava}/src-llava /tmp/enginefarm-cache
    ;;
  llama)
      # LLaMA-7B fp16 (LAOTI7B): build (the validate step reports the near-tie rule over LLAMA_NEW_TOKENS greedy
      # tokens), bench, roofline; gpt-fast with GPTFAST_RUN=1. The text engine's baselines are gpt-fast, the
      # roofline and the fp16 engine: its benches skip eager HF
      fp16_build && { fp16_bench; bash "$0" roofline7b; [ -n "$GPTFAST_RUN" ] && bash "$0" gptfast7b; }
      df -h /tmp /dev/shm; rm -rf /tmp/ef7b/store /tmp/enginefarm-cache /dev/shm/gf-ckpt-* /tmp/gf-ckpt-*
    ;;
  quant)
      # the same weights' W8A16 and W4A16 variants (QAOTI7B), each benched and set against llama's fp16 rows
      quant_build; quant_benches
      rm -rf "$QSTORE" /tmp/enginefarm-cache
    ;;
  both)
      # llama's fp16 build and quant's W8A16/W4A16 build side by side, as two processes (for a session short of
      # device time: their step times and the GPU's peak memory overlap), then every bench alone, one at a time
      llama_src  # written once, before the two builds that read it
      quant_build > "$OUT/7bq_build.log" 2>&1 & qpid=$!
      fp16_build; frc=$?
      wait $qpid; stamp "quant build rc=$?"; grep -v "^ \|^{\|^}" "$OUT/7bq_build.log" | head -40
      [ $frc = 0 ] && fp16_bench
      quant_benches
      [ $frc = 0 ] && bash "$0" roofline7b
      df -h /tmp /dev/shm; rm -rf /tmp/ef7b/store "$QSTORE" /tmp/enginefarm-cache
    ;;
  clip)
      # CLIP ViT-L/14-336 (+ projector) as a LLaVA recipe's visual engine, with a 2-layer language model: the
      # visual engine's figures (the farm's fused tower, static per-batch packages) at batch 1 and 8 against eager HF
      SHAPED_LLM_LAYERS=2 LLAVA_NAME=llava-clip-shaped W_LLAVA=/tmp/efclip QUANTS=none MAX_BATCH=8 NO_BENCH=1 \
        VISUAL_AOTI="${LLAVA_VISUAL_AOTI:-{cuda_graphs: true, static_batches: true\}}" bash "$0" llava7b
      W_LLAVA=/tmp/efclip BENCH_ARGS="--batch 1,8 --input-len 18 --output-len 8 --iters 5" bash "$0" benchllava
      rm -rf /tmp/efclip ${SRC_ROOT:-/tmp/efclip}/src-llava /tmp/enginefarm-cache
    ;;
  *) echo "BLOCKS: no block $block (llava, llama, quant, both, clip)" >&2; exit 2 ;;
  esac
  done
  df -h /tmp /dev/shm; stamp "all done"; touch "$OUT/all.done" ;;
session)
  # for a device whose calls are shorter than `all`: the first call starts `all` in a process session of its own
  # (it outlives the call), and each call waits up to WAIT seconds for it, then hands back its log and results
  # (engines excepted) as $OUT/gpu_all.tgz
  # The run reads a copy of the tree taken by the first call: a later call's tree (re-copied by the device tool)
  # must not change the scripts under it
  R=/tmp/gpu_all; mkdir -p $R
  if [ ! -e $R/started ]; then
    touch $R/started; rm -rf /tmp/gpu_repo; cp -a . /tmp/gpu_repo
    (cd /tmp/gpu_repo && OUT=$R setsid nohup bash bench/gpu_product.sh all > $R/all.log 2>&1 < /dev/null &)
  fi
  end=$((SECONDS + ${WAIT:-540})); while [ $SECONDS -lt $end ] && [ ! -e $R/all.done ]; do sleep 5; done
  tail -c 8000 $R/all.log; tar -czf "$OUT/gpu_all.tgz" -C $R . ; ls -la $R ;;
*)
  echo "usage: bash bench/gpu_product.sh tiny|llama7b|bench7b|roofline7b|gptfast7b|llava7b|benchllava|all|session" >&2
  exit 2 ;;
esac
