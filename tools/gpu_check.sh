#!/usr/bin/env bash
# One prepared run on a GPU machine without network (Python 3.12, torch with CUDA, onnx and the CPU build
# of onnxruntime preinstalled; numba/scipy too, which this check does not need). Run from the repository
# root by the device tool (the paper's experiment at full size: tools/gpu_paper.sh):
#
#   here:   python tools/gpu_prepare.py            # prunes the models into .cache/gpu_models (carried)
#   device: bash tools/gpu_check.sh                # carry: [".cache/gpu_models"] (+ ".cache/gpu_wheels")
#
# 1. prints the GPU and the providers ONNX Runtime really offers; if .cache/gpu_wheels holds the pieces of
#    an onnxruntime-gpu wheel (tools/gpu_prepare.py --ort-gpu-wheel), installs it with --no-deps into
#    .gpu_site (never over the system's onnxruntime) and puts that first on PYTHONPATH;
# 2. checks whether a CUDA session really runs on CUDA (get_providers() after creation);
# 3. if it does: `lean-onnx bench original keep* --provider cuda --strict --json` per model;
#    in any case: the same models timed on the GPU through torch (tools/gpu_torch_bench.py), labelled so;
# 4. with 2 or more GPUs: finetune on 1 process against torchrun with one process per GPU (tools/bench_ddp.py);
# 5. writes gpu_check.log, providers.json, bench_<model>.json, torch_cuda.json (and ddp.json) to $OUT.
set -u
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
cd "$(dirname "$0")/.."
MODELS="${GPU_MODELS:-.cache/gpu_models}"
WHEELS="${GPU_WHEELS:-.cache/gpu_wheels}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== machine"; date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
"$PY" -c 'import sys, torch, onnx, onnxruntime as o; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(), "onnx", onnx.__version__, "onnxruntime", o.__version__, o.get_available_providers())'

if ls "$WHEELS"/*.part* >/dev/null 2>&1; then
  echo "== installing onnxruntime-gpu from $WHEELS (no deps, into .gpu_site)"
  wheel_name="$(ls "$WHEELS"/*.part00 | head -1 | xargs basename | sed 's/\.part00$//')"
  cat "$WHEELS"/"$wheel_name".part* > "/tmp/$wheel_name"
  "$PY" -m pip install --no-deps --no-index --quiet --target .gpu_site "/tmp/$wheel_name" && export PYTHONPATH="$PWD/.gpu_site:$PYTHONPATH"
fi

echo "== providers"
"$PY" - "$OUT/providers.json" <<'PYEOF'
import json, sys
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto, numpy_helper
w = numpy_helper.from_array(np.ones((8, 3, 3, 3), np.float32), "w")
g = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "g",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
result = {"onnxruntime": ort.__version__, "file": ort.__file__, "available": ort.get_available_providers()}
try:
    s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    s.run(None, {"x": np.ones((1, 3, 32, 32), np.float32)})
    result["session_providers"] = s.get_providers()
except Exception as e:
    result["error"] = str(e).splitlines()[0]
result["cuda_runs"] = result.get("session_providers", [""])[0] == "CUDAExecutionProvider"
print(json.dumps(result, indent=1))
json.dump(result, open(sys.argv[1], "w"), indent=1)
PYEOF

if grep -q '"cuda_runs": true' "$OUT/providers.json"; then
  for folder in "$MODELS"/*/; do
    name="$(basename "$folder")"
    echo "== ONNX Runtime CUDA: $name"
    "$PY" -m lean_onnx bench "$folder/original.onnx" $(ls "$folder"/keep*.onnx | sort -r) --provider cuda \
      --strict --runs 100 --warmup 20 --json > "$OUT/bench_$name.json" && "$PY" -c "
import json; d = json.load(open('$OUT/bench_$name.json'))
for m in d['models']: print(m['path'], m['provider'], round(m['latency_ms']['median'], 3), 'ms', 'x%.2f' % m['speedup_vs_first'])"
  done
else
  echo "== ONNX Runtime's CUDA provider does not run here (see providers.json)"
fi

echo "== torch on the GPU (lean_onnx.train.bridge), labelled as such"
"$PY" tools/gpu_torch_bench.py "$MODELS" --device cuda --runs 100 --warmup 20 --json "$OUT/torch_cuda.json"
GPUS="$(nvidia-smi -L 2>/dev/null | wc -l)"
if [ "$GPUS" -ge 2 ]; then  # nccl needs one GPU per process: 1 vs N processes (docs/finetune.md, issue 20)
  echo "== data-parallel finetune: 1 process vs torchrun --nproc-per-node $GPUS (nccl)"
  "$PY" tools/bench_ddp.py --processes "$GPUS" --rounds 1 --only msd --images 64 --batch 16 --json "$OUT/ddp.json"
else
  echo "== data-parallel finetune: $GPUS GPU, nccl needs 2 (one per process); not run"
fi
echo "== done"; date -u
