#!/usr/bin/env bash
# Throughput test, as the reference's scripts/stress-test.sh: TOTAL `agentkernel run -- echo hello`
# processes, at most CONCURRENCY at a time (default 100 and 10), cold, through the daemon's warm pool,
# and the raw engine, per backend; commands/s, success rate, latency percentiles; then the stress suite
# (STRESS_VM_COUNT sandboxes, STRESS_MAX_CONCURRENT at once, full lifecycle, leak check).
#
#   scripts/stress-test.sh                       # 100 runs, 10 concurrent, every available backend
#   scripts/stress-test.sh 200 20 --backends podman
#   STRESS_VM_COUNT=1000 STRESS_MAX_CONCURRENT=100 scripts/stress-test.sh 100 10 --backends podman
#
# A thin wrapper around `agentkernel bench --suite throughput,stress`; extra arguments pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
AK=agentkernel
if [ -x .venv/bin/agentkernel ]; then AK=.venv/bin/agentkernel; fi
total=100
conc=10
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then total=$1; shift; fi
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then conc=$1; shift; fi
exec "$AK" bench --suite throughput,stress --runs-total "$total" --runs-concurrency "$conc" "$@"
