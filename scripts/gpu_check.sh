#!/usr/bin/env bash
# The whole GPU check (issues 12 and 30) in one call, sized for one H100/H200 and under 8 minutes:
#   1. bench/bench_gpu.py: OPT-1.3B and 6.7B, MeZO's setting (16 x 256, fp32 and bf16) and ZO2's
#      (1 x 2048, fp16): distzo streaming at server.update_window 1 and at the plan's recommended K,
#      resident MeZO and ZO2 side by side; the Triton kernels' rates (the replay of 8 pending records
#      fused into the perturbation among them) against a device copy; its table,
#   2. with the time left (TOTAL_S in all), the GPU tests that prove the bits (the replay's too) and the
#      no-host-copy fetch path, and zoctl up == zoctl reference bitwise on the GPU (dual; fp32 and bf16
#      served; bf16 with update windows of 4).
# The benchmark goes first: GPU time is short, and the tests' bits were checked on CPU in Triton's interpreter.
# ZO2 must be prepared first (bench/README-gpu.md): bench/peers/zo2 and bench/peers/wheels, git-ignored.
# Usage: scripts/gpu_check.sh [extra bench_gpu.py flags]   (e.g. --sizes 1.3b --budget-s 200)
# Env: OUT (results folder, default bench/results), WORK (scratch, default /tmp/distzo-gpu-bench),
#      PYTHON (default python3), TOTAL_S (the whole check's seconds, default 480; the benchmark gets
#      BENCH_S of them, default 300), SKIP_TESTS=1 (bench only, for a rerun).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
WORK=${WORK:-/tmp/distzo-gpu-bench}
PEERS=bench/peers
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-480}
BENCH_S=${BENCH_S:-300}
mkdir -p "$OUT" "$WORK"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$WORK/cache/triton}  # one kernel cache for the tests and every process
stamp=$(date +%Y%m%d-%H%M%S)
t0=$(date +%s)

zo2_flags=()
if [ -f "$PEERS/zo2/test/mezo_sgd/hf_opt/test_speed.py" ]; then
  if [ ! -d "$PEERS/zo2-site/transformers" ] && [ -d "$PEERS/wheels" ]; then
    # ZO2 pins transformers 4.51: into its own target directory, never into this environment (no internet here)
    "$PY" -m pip install -q --no-index --no-deps --find-links "$PEERS/wheels" --target "$PEERS/zo2-site" \
      "$PEERS"/wheels/*.whl || echo "gpu_check: installing ZO2's wheels failed; its rows will fail" >&2
  fi
  zo2_flags=(--zo2 "$PEERS/zo2" --zo2-site "$PEERS/zo2-site")
else
  echo "gpu_check: no ZO2 checkout in $PEERS/zo2 (bench/README-gpu.md); running without the ZO2 side" >&2
  zo2_flags=(--sides distzo,resident)
fi

echo "== benchmark"
"$PY" -c 'import torch, transformers, triton; print("torch", torch.__version__, "transformers", transformers.__version__,
  "triton", triton.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")'
# a row starts only while the budget lasts; the last one may run over it by its own length
"$PY" bench/bench_gpu.py --work "$WORK" --budget-s "$(( BENCH_S - 60 ))" "${zo2_flags[@]}" \
  --json-out "$OUT/gpu-$stamp.json" "$@"
echo "bench: exit $? after $(( $(date +%s) - t0 )) s"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  left=$(( TOTAL_S - ($(date +%s) - t0) ))
  echo "== GPU tests (${left} s left)"
  if [ "$left" -gt 30 ]; then
    timeout "$left" "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_generator.py tests/test_served.py \
      tests/test_window.py -k "(cuda or triton) and (not zoctl or dual-1-)" 2>&1 | tail -15
    echo "tests: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
  fi
  left=$(( TOTAL_S - ($(date +%s) - t0) ))
  if [ "$left" -gt 30 ]; then
    timeout "$left" "$PY" -m pytest -q -p no:cacheprovider tests/test_worker.py -k "dual_worker and cuda" 2>&1 | tail -5
    echo "worker tests: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
  fi
fi
echo "gpu_check: $(( $(date +%s) - t0 )) s in all; results in $OUT/gpu-$stamp.json"
