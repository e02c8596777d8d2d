"""The benchmark suites. ``SUITES`` maps a suite name to ``module:function`` (the function takes the
``BenchContext``); a module is imported only when one of its suites is selected."""

SUITES = {
    "headline": "agentkernel.bench.suites.headline:run",
    "phases": "agentkernel.bench.suites.phases:run",
    "baselines": "agentkernel.bench.suites.baselines:run",
    "inproc": "agentkernel.bench.suites.inproc:run",
    "daemon": "agentkernel.bench.suites.daemon:run",
    "throughput": "agentkernel.bench.suites.concurrency:run_throughput",
    "concurrency": "agentkernel.bench.suites.concurrency:run_concurrency",
    "stress": "agentkernel.bench.suites.stress:run",
    "lifecycle": "agentkernel.bench.suites.lifecycle:run",
    "wasm": "agentkernel.bench.suites.wasm:run",
    "orchestration": "agentkernel.bench.suites.orchestration:run",
    "egress": "agentkernel.bench.suites.egress:run",
    "speed": "agentkernel.bench.suites.sustained:run_speed",
    "soak": "agentkernel.bench.suites.sustained:run_soak",
    "live": "agentkernel.bench.suites.sustained:run_live",
}
