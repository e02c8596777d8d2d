"""The benchmark and stress suite (``agentkernel bench``): every table of the reference's benchmark page,
measured beside the raw engines in the same run, as JSON (``schema.py``), Markdown (``report.py``) and
PNG charts (``charts.py``). How each number is measured: docs/benchmark-method.md.

Modules: ``stats`` (percentiles, summaries), ``machine`` (what every figure is labelled with),
``harness`` (config, context, timing, interleaving, the bench's own daemon, progress), ``suites/*``
(one module per suite), ``leaks`` (the leak check), ``runner`` (runs the selected suites and writes the
outputs), ``compare`` (two runs side by side), ``wasm_bench`` (the wasm backend's own numbers).
"""
