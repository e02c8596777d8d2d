"""Every exit status 0..255 through the remote backends' own decoding, in the formats their engines send,
and through the shell wrapper their exec runs (with and without a timeout), on this host's /bin/sh.

This is what lets the conformance suite run a sample of exit codes on kubernetes and nomad
(tests/conformance/test_conformance.py, REMOTE_EXIT_SAMPLE) instead of 256 exec round trips each."""

from __future__ import annotations

import json
import subprocess

import pytest

from agentkernel.backends import _remote_exec
from agentkernel.backends._kube_api import parse_exec_status
from agentkernel.backends._nomad_api import exit_code_of

CODES = range(256)


def kube_status(code: int) -> bytes:
    """The metav1.Status the kubelet writes on an exec's status channel (remotecommand v4)."""
    if code == 0:
        return json.dumps({"metadata": {}, "status": "Success"}).encode()
    return json.dumps({"metadata": {}, "status": "Failure", "message": f"command terminated with non-zero exit "
                       f"code: error executing command [sh -c exit {code}], exit code {code}",
                       "reason": "NonZeroExitCode",
                       "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}).encode()


def test_kubernetes_status_channel_decodes_every_exit_code():
    assert [parse_exec_status(kube_status(c), "p") for c in CODES] == list(CODES)


def test_nomad_exit_frame_decodes_every_exit_code():
    assert [exit_code_of({"exited": True, "result": {"exit_code": c}}) for c in CODES] == list(CODES)
    assert exit_code_of({"exited": True, "result": {}}) == 0


def test_outcome_keeps_every_code_and_reads_129_to_192_as_signals():
    for c in CODES:
        code, sig, timed_out = _remote_exec.outcome(c, 0.01, None)
        assert (code, timed_out) == (c, False)
        assert sig == (c - 128 if 129 <= c <= 192 else None), c


@pytest.mark.parametrize("timeout,stdin_length", [(None, None), (30, None), (None, 0), (30, 0)],
                         ids=["exec", "timeout", "stdin-length", "timeout-stdin-length"])
def test_wrapper_script_passes_every_exit_code(timeout, stdin_length):
    """The argv kubernetes and nomad exec (``_remote_exec.wrap``), run by a real shell (dash here; the
    pods' is busybox sh): its status is the command's for every value, on each of its paths: the shell
    execs the command; the command in its own session, collected by ``wait`` (a timeout); the command
    behind ``head -c`` (protocols without stdin EOF)."""
    script = "".join(
        f'{_quote(_remote_exec.wrap(["sh", "-c", f"exit {c}"], cwd="/", timeout=timeout, stdin_length=stdin_length))}'
        ' </dev/null; echo $?\n' for c in CODES)
    r = subprocess.run(["/bin/sh", "-s"], input=script, capture_output=True, text=True, timeout=120)
    assert [int(x) for x in r.stdout.split()] == list(CODES), r.stderr[-2000:]


def _quote(argv: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in argv)
