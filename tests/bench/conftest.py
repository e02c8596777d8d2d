"""Helpers for the bench tests: a synthetic results document built through the real harness code."""

from __future__ import annotations

import pytest

from agentkernel.bench import schema
from agentkernel.bench.harness import BenchConfig, BenchContext, Sample


def make_doc(p50_scale: float = 1.0, backends: dict | None = None) -> dict:
    cfg = BenchConfig(backends=["podman", "qemu"], suites=["headline"], iterations=3, warmup=1, quick=True,
                      progress=False)
    ctx = BenchContext(cfg)
    try:
        ctx._doctor = {}
        ctx.doc["backends"] = backends or {
            "podman": {"available": True, "reason": "podman 4.3.1", "isolation": "container (shared kernel)",
                       "image": "agentkernel/busybox"},
            "qemu": {"available": False, "reason": "backend 'qemu' is not built into this version of agentkernel",
                     "isolation": None, "image": None},
        }
        s = p50_scale
        ctx.add_measurement(suite="headline", backend="podman", name="cold", label="agentkernel run --no-daemon",
                            mode="cold", samples=[Sample(True, 190 * s), Sample(True, 200 * s), Sample(True, 210 * s),
                                                  Sample(False, 5.0, "exit 125: boom")],
                            warmup=[Sample(True, 400.0)], command=["agentkernel", "run"], image="agentkernel/busybox")
        ctx.add_measurement(suite="headline", backend="podman", name="warm", label="agentkernel run (daemon)",
                            mode="warm", samples=[Sample(True, 20 * s), Sample(True, 22 * s), Sample(True, 24 * s)])
        ctx.add_measurement(suite="headline", backend="podman", name="raw_podman", label="podman run --rm (plain)",
                            mode="raw", samples=[Sample(True, 300.0), Sample(True, 310.0), Sample(True, 320.0)])
        ctx.add_unavailable(suite="headline", backend="qemu", name="cold", label="agentkernel run (cold)", mode="cold",
                            reason=ctx.doc["backends"]["qemu"]["reason"])
        ctx.add_unavailable(suite="headline", backend="qemu", name="raw_qemu_boot", label="raw QEMU boot",
                            mode="raw", reason=ctx.doc["backends"]["qemu"]["reason"])
        for ours in ("cold", "warm"):
            ctx.add_ratio(suite="headline", backend="podman", ours=f"headline/podman/{ours}",
                          raw="headline/podman/raw_podman", label=f"{ours} vs podman run --rm (plain)")
        ctx.doc["duration_s"] = 1.0
        return schema.finalize(ctx.doc)
    finally:
        ctx.close()


@pytest.fixture
def synthetic_doc() -> dict:
    return make_doc()
