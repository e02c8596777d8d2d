#!/usr/bin/env bash
# The benchmark suite: every table of the reference's benchmark page, beside the raw engines, in one run.
#
#   scripts/benchmark.sh                 # everything, every backend -> benchmark-results/
#   scripts/benchmark.sh 5               # 5 measured runs per command (the reference's [iterations])
#   scripts/benchmark.sh --docs          # ... and regenerate docs/benchmarks.md + docs/benchmarks/*.png
#   scripts/benchmark.sh --quick --backends podman,wasm --suite headline,phases
#
# Environment, as the reference's tests: STRESS_VM_COUNT, STRESS_MAX_CONCURRENT, BENCH_SANDBOXES,
# BENCH_ITERATIONS, BENCH_MAX_CONCURRENT. A thin wrapper around `agentkernel bench` (see
# docs/benchmark-method.md); any other arguments are passed through.
set -euo pipefail
cd "$(dirname "$0")/.."
AK=agentkernel
if [ -x .venv/bin/agentkernel ]; then AK=.venv/bin/agentkernel; fi
args=()
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then
  args+=(--iterations "$1")
  shift
fi
exec "$AK" bench "${args[@]}" "$@"
