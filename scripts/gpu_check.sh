#!/usr/bin/env bash
# The whole GPU check of issue 12 in one call, sized for one H100/H200 and under 8 minutes:
#   1. the GPU tests that prove the bits and the no-host-copy fetch path (about 1-2 min),
#   2. bench/bench_gpu.py: OPT-1.3B and 6.7B, MeZO's setting (16 x 256, fp32 and bf16) and ZO2's
#      (1 x 2048, fp16): distzo streaming, resident MeZO and ZO2 side by side; a short table last.
# ZO2 must be prepared first (bench/README-gpu.md): bench/peers/zo2 and bench/peers/wheels, git-ignored.
# Usage: scripts/gpu_check.sh [extra bench_gpu.py flags]   (e.g. --sizes 1.3b --budget-s 200)
# Env: OUT (results folder, default bench/results), WORK (scratch, default /tmp/distzo-gpu-bench),
#      SKIP_TESTS=1 (bench only, for a rerun), TEST_TIMEOUT (s, default 150).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
WORK=${WORK:-/tmp/distzo-gpu-bench}
PEERS=bench/peers
mkdir -p "$OUT" "$WORK"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$WORK/cache/triton}  # one kernel cache for the tests and every process
stamp=$(date +%Y%m%d-%H%M%S)
t0=$(date +%s)

zo2_flags=()
if [ -f "$PEERS/zo2/test/mezo_sgd/hf_opt/test_speed.py" ]; then
  if [ ! -d "$PEERS/zo2-site/transformers" ] && [ -d "$PEERS/wheels" ]; then
    # ZO2 pins transformers 4.51: into its own target directory, never into this environment (no internet here)
    python -m pip install -q --no-index --no-deps --find-links "$PEERS/wheels" --target "$PEERS/zo2-site" \
      "$PEERS"/wheels/*.whl || echo "gpu_check: installing ZO2's wheels failed; its rows will fail" >&2
  fi
  zo2_flags=(--zo2 "$PEERS/zo2" --zo2-site "$PEERS/zo2-site")
else
  echo "gpu_check: no ZO2 checkout in $PEERS/zo2 (bench/README-gpu.md); running without the ZO2 side" >&2
  zo2_flags=(--sides distzo,resident)
fi

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== GPU tests"
  timeout "${TEST_TIMEOUT:-150}" python -m pytest -q -p no:cacheprovider \
    tests/test_gpu.py tests/test_generator.py tests/test_served.py -k "(cuda or triton) and not zoctl" 2>&1 | tail -15
  echo "tests: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
  timeout "${TEST_TIMEOUT:-150}" python -m pytest -q -p no:cacheprovider tests/test_worker.py -k "dual_worker and cuda" 2>&1 | tail -5
  echo "worker tests: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 )) s"
fi

echo "== benchmark"
left=$(( 460 - ($(date +%s) - t0) ))
[ "$left" -lt 60 ] && left=60
python bench/bench_gpu.py --work "$WORK" --budget-s "$(( left - 90 ))" "${zo2_flags[@]}" \
  --json-out "$OUT/gpu-$stamp.json" "$@"
echo "gpu_check: $(( $(date +%s) - t0 )) s in all; results in $OUT/gpu-$stamp.json"
