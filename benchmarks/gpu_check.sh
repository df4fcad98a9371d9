#!/usr/bin/env bash
# Every GPU check of rudalle_pipe in one run, made to fit a short lease on a GPU machine (about 5
# minutes on one H200 before steps 5; each step has its own time limit):
#   1. the tests marked `gpu` (tests/test_gpu.py: cached/static vs full logits in fp32/fp16/bf16,
#      fp16/bf16 vs fp32, CUDA generators, same-seed semantics, static vs dynamic decoder, the demo chain);
#   2. benchmarks/gpu_semantics.py: what "same seed, same image" means on the GPU, greedy drift;
#   3. benchmarks/gpu_bench.py: Malevich-shaped fp16 decoding at batch 1, 8, 32, ours (plain cached
#      step, and the fixed-shape step replayed as a CUDA graph) against the original rudalle 1.1.3;
#   4. the CLI's first command on the GPU (demo pipeline), timed;
#   5. the scale-out checks (issue 13): the 2-process training-equivalence and generation-invariance
#      tests (gloo processes on this machine's CPUs; they hide CUDA), then a prompt file drawn on the GPU
#      by one process under `accelerate launch` and by a plain process: the same PNGs and manifest
#      (each results.json differs in its timings).
#      accelerate must be importable (the [train] extra).
#
# Usage:  bash benchmarks/gpu_check.sh [OUT_DIR]        (default OUT_DIR: ./gpu_check_out)
# Needs python3 with a CUDA torch and the package's dependencies importable; the package itself is
# taken from this checkout. RUDALLE_REFERENCE_SRC: a folder holding the original's source (the
# folder with rudalle/ in it, e.g. the unpacked rudalle-1.1.3 wheel); without it, that column is skipped.
# Exit status: 0 when every step passed.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${1:-gpu_check_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.txt
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" = 0 ] || status=1
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" \
  | tee -a "$out/gpu.txt"
step gpu_tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu -rfEs tests/test_gpu.py
step gpu_semantics 120 python3 benchmarks/gpu_semantics.py --json "$out/gpu_semantics.json"
step gpu_bench 210 python3 benchmarks/gpu_bench.py ${RUDALLE_REFERENCE_SRC:+--reference-src "$RUDALLE_REFERENCE_SRC"} \
  --json "$out/gpu_bench.json"
work=$(mktemp -d)
step first_command 60 python3 -m rudalle_pipe generate "красный круг" \
  --device cuda --seed 0 --no-progress --out "$work/out"
ls "$work/out" >>"$out/first_command.txt" 2>&1
rm -rf "$work"
step distributed_tests 150 python3 -m pytest -q -p no:cacheprovider -rfEs tests/test_distributed.py \
  tests/test_prompt_file.py
work=$(mktemp -d)
printf '%s\n' "красный круг" "синий квадрат" "зелёный треугольник" >"$work/prompts.txt"
step prompts_gpu 90 bash -c "python3 -m rudalle_pipe generate --prompts '$work/prompts.txt' --num-images 4 --seed 0 \
  --device cuda --no-progress --out '$work/plain' && python3 -m accelerate.commands.launch --num_processes 1 \
  --num_machines 1 --mixed_precision no --dynamo_backend no -m rudalle_pipe generate --prompts '$work/prompts.txt' \
  --num-images 4 --seed 0 --device cuda --no-progress --out '$work/launched' \
  && diff -r -x run.json -x results.json '$work/plain' '$work/launched' && echo 'accelerate launch and a plain process: the same PNGs and results.jsonl'"
rm -rf "$work"
echo "== gpu_check: exit $status"
exit $status
