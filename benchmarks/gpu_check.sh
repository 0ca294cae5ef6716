#!/usr/bin/env bash
# One prepared check for a machine with an NVIDIA GPU, in under 8 minutes:
#   1. tests/test_kernels.py with the compiled Triton kernels on CUDA (no interpreter),
#   2. benchmarks/kernels_bench.py --quick on CUDA (ceiling, encoder, localize,
#      fused localization, local alignment),
#   3. benchmarks/compile_bench.py on CUDA: eager vs AOTInductor, and TensorRT fp16
#      wherever torch_tensorrt imports (the one real exercise of `afloc compile
#      --backend tensorrt`; target: TensorRT fp16 >= 3x eager fp32),
# and one table at the end (the benchmark's, with the test result as its first row).
#
#   bash benchmarks/gpu_check.sh            # PYTHON=/path/to/python to pick the interpreter
#
# Each step has its own time limit, so a hung compile cannot eat the whole budget;
# a step that fails or times out is reported in the table, not hidden.
set -uo pipefail

cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
  PY="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  PY=.venv/bin/python
else
  PY=python3
fi
TEST_LIMIT=${TEST_LIMIT:-210}
BENCH_LIMIT=${BENCH_LIMIT:-240}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET AFLOC_KERNELS

start=$(date +%s)
echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi unavailable"
"$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(0))
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
EOF

echo "== tests (compiled Triton on CUDA, limit ${TEST_LIMIT}s)"
log=$(mktemp)
timeout "$TEST_LIMIT" "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tee "$log" | tail -25
rc=${PIPESTATUS[0]}
summary=$(grep -E "(passed|failed|error|skipped)" "$log" | tail -1)
if [[ $rc -eq 124 ]]; then
  summary="TIMED OUT after ${TEST_LIMIT}s; ${summary}"
elif [[ -z "$summary" ]]; then
  summary="pytest exit code $rc (no summary line)"
fi
rm -f "$log"

echo "== benchmark (--quick, limit ${BENCH_LIMIT}s)"
AFLOC_TESTS_SUMMARY="$summary" timeout "$BENCH_LIMIT" "$PY" benchmarks/kernels_bench.py --quick --device auto
brc=$?
if [[ $brc -ne 0 ]]; then
  echo "benchmark exit code $brc$([[ $brc -eq 124 ]] && echo ' (timed out)')"
  echo "tests: $summary"
fi
COMPILE_LIMIT=${COMPILE_LIMIT:-150}
echo "== compile (eager vs AOTInductor / TensorRT on CUDA, limit ${COMPILE_LIMIT}s)"
if ! "$PY" -c "import torch_tensorrt" 2>/dev/null; then
  echo "torch_tensorrt does not import here: TensorRT not exercised (AOTInductor still measured)"
fi
timeout "$COMPILE_LIMIT" "$PY" benchmarks/compile_bench.py --models small,resnet50 --batch-sizes 1,8,64 --device cuda
crc=$?
[[ $crc -ne 0 ]] && echo "compile benchmark exit code $crc$([[ $crc -eq 124 ]] && echo ' (timed out)')"
echo "== done in $(( $(date +%s) - start ))s"
exit $(( rc != 0 || brc != 0 || crc != 0 ))
