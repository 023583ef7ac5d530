#!/usr/bin/env bash
# The paper's MS-D experiment at full size (full 256 x 256 training images, as the reference; issue 5) on
# a GPU machine, through the device tool. Needs only what that image holds (python3 with torch+CUDA, onnx,
# onnxruntime (CPU), numpy, numba, networkx, scipy, matplotlib); nothing is installed. From the repo root:
#
#   device: bash tools/gpu_paper.sh            # no carry needed: the data are generated there (~1 min)
#
# Runs lean, sv and l1 as three parallel processes (one GPU, 16 cores) with --device cuda, checkpoints in
# .cache/paper_gpu (git-ignored, so it stays on a warm machine: calling the script again resumes after the
# last finished step of each method). Stops itself after PAPER_SECONDS (default 480) so the call ends
# inside the tool's 10-minute limit. Writes to $OUT: the per-method logs, each method's state.json and
# results_gpu.md/.png/.json (the table from the finished steps, with reproduce_paper's verdict).
# Test it on a CPU with tiny settings: DEVICE=cpu PAPER_ARGS="--steps 2 --epochs-per-step 1" bash tools/gpu_paper.sh
set -u
OUT="${OUT:-/tmp/gpu_paper_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WORK="${PAPER_WORK:-.cache/paper_gpu}"
DEVICE="${DEVICE:-cuda}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$WORK"
exec > >(tee -a "$OUT/gpu_paper.log") 2>&1

echo "== machine"; date -u; nvidia-smi --query-gpu=name,memory.total --format=csv 2>&1 | head -2
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
if [ ! -f .cache/cs/test.npz ]; then
  echo "== generating Circle-Square into .cache/cs"; "$PY" -m lean_onnx.train.circle_square .cache/cs || exit 1
fi

echo "== schedule (lean, sv, l1 in parallel, device $DEVICE, full images unless PAPER_ARGS says otherwise)"
pids=""
for method in lean sv l1; do
  timeout "${PAPER_SECONDS:-480}" "$PY" tools/reproduce_paper.py --methods "$method" --device "$DEVICE" --eval-threads 4 \
    --threads 4 --work "$WORK" ${PAPER_ARGS:-} > "$OUT/$method.log" 2>&1 &
  pids="$pids $!"
done
wait $pids  # not a bare `wait`: bash >= 5.1 would also wait for the tee above, forever
for method in lean sv l1; do
  tail -n 3 "$OUT/$method.log"
  [ -f "$WORK/$method/state.json" ] && cp "$WORK/$method/state.json" "$OUT/state_$method.json"
done

echo "== table from the finished steps"
"$PY" tools/reproduce_paper.py --methods lean,sv,l1 --work "$WORK" --report-only --eval-threads 12 ${PAPER_ARGS:-} \
  --note "Run by tools/gpu_paper.sh: --device $DEVICE, ${PAPER_ARGS:-full 256 x 256 training images}." --write "$OUT/results_gpu.md" \
  > "$OUT/report.log" 2>&1 || tail -n 5 "$OUT/report.log"
echo "== done"; date -u
