#!/usr/bin/env bash
# Every GPU figure from one command, on a machine with one CUDA GPU, nvcc and ninja (no network needed):
#
#     bash bench/gpu.sh            # -> bench/RESULTS.md (+ logs in bench/gpu-logs/)
#
# Steps (each with its own time limit; the whole run is meant to fit in 8 minutes on one H100/H200):
#   1. build with CUDA kernels against the torch installed here (pip, no build isolation, no deps);
#   2. the CUDA tests (segment_gram on CUDA, CPU == CUDA bit for bit, opcheck on CUDA);
#   3. compute-sanitizer (memcheck) on a small subset of them;
#   4. the GPU benchmarks: ops vs pure torch (bench_ops.py), segment_gram vs cuBLAS, 10,000 snapshots
#      end to end, perturbation bandwidth (gpu_bench.py), the loss surface (bench_landscape.py --device
#      cuda), all written into bench/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PYLANDSCAPE_CUDA=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYLANDSCAPE_REQUIRE_EXT=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOGS=bench/gpu-logs
mkdir -p "$LOGS"
T0=$(date +%s)
step() { echo "[gpu.sh $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOGS/steps.log"; }
: > "$LOGS/steps.log"

step "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
if ! timeout 300 python -m pip install --no-build-isolation --no-deps -v . > "$LOGS/build.log" 2>&1; then
  step "pip install failed (see $LOGS/build.log); trying an in-place build"
  timeout 300 python setup.py build_ext --inplace >> "$LOGS/build.log" 2>&1 || { step "build FAILED"; exit 1; }
fi
python -c "import pylandscape as p; assert p.has_cuda_kernels(), 'no CUDA kernels in the build'" || exit 1

step "CUDA tests"
CUDA_TESTS=(tests/test_ops_api.py tests/test_gram.py tests/test_ops_perturb.py tests/test_ops_stats.py)
timeout 240 python -m pytest -q -p no:cacheprovider -rs "${CUDA_TESTS[@]}" -k "cuda or opcheck or non_differentiable" \
  > "$LOGS/tests.log" 2>&1
TESTS_RC=$?
step "CUDA tests rc=$TESTS_RC ($(tail -1 "$LOGS/tests.log"))"

step "compute-sanitizer memcheck"
SAN_RC=skipped
if command -v compute-sanitizer > /dev/null; then
  timeout 180 compute-sanitizer --tool memcheck --error-exitcode 99 --target-processes all \
    python -m pytest -q -p no:cacheprovider -x tests/test_ops_api.py::test_cuda_equals_cpu \
    "tests/test_gram.py::test_cuda_gram_matches_the_bar[fp32_block_boundary]" \
    "tests/test_gram.py::test_cuda_gram_matches_the_bar[subblock_refinement]" > "$LOGS/sanitizer.log" 2>&1
  SAN_RC=$?
fi
step "compute-sanitizer rc=$SAN_RC"

step "benchmarks"
timeout 120 python bench/run_table.py -k "cuda" > "$LOGS/ops.log" 2>&1
timeout 200 python bench/gpu_bench.py --out "$LOGS/gpu_bench.md" > "$LOGS/gpu_bench.log" 2>&1
# the loss surface: grouped K-models-per-pass on the GPU vs loss-landscapes and the copy+forward loop
timeout 120 python bench/bench_landscape.py --device cuda --points 49 --repeats 2 --batch 1500 \
  > "$LOGS/landscape.log" 2>&1
step "done"

{
  echo "# GPU results ($(date -u +%Y-%m-%dT%H:%MZ))"
  echo
  echo "Written by \`bash bench/gpu.sh\` in $(( $(date +%s) - T0 )) s."
  echo
  echo '```'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo '```'
  echo
  echo "## Tests"
  echo
  echo "- CUDA tests: exit $TESTS_RC — $(tail -1 "$LOGS/tests.log")"
  echo "- compute-sanitizer memcheck: exit $SAN_RC ($(grep -c 'ERROR SUMMARY: 0 errors' "$LOGS/sanitizer.log" 2>/dev/null || echo 0) clean summaries)"
  echo
  echo "## Ops vs pure torch (bench/bench_ops.py on CUDA)"
  echo
  grep '^|' "$LOGS/ops.log" || echo "(no table: see $LOGS/ops.log)"
  echo
  cat "$LOGS/gpu_bench.md" 2>/dev/null || echo "(gpu_bench failed: see $LOGS/gpu_bench.log)"
  echo
  echo "## Loss surface on the GPU (bench/bench_landscape.py --device cuda)"
  echo
  grep -E '^(\||51 x 51)' "$LOGS/landscape.log" || echo "(no table: see $LOGS/landscape.log)"
  echo
  echo "## Step times"
  echo
  sed 's/^/    /' "$LOGS/steps.log"
} > bench/RESULTS.md
echo "wrote bench/RESULTS.md"
