"""The raw baseline the benchmark times beside ``agentkernel run -B qemu``: QEMU itself restoring the same
snapshot template our sandboxes start from, with none of our code on the path.

``baseline_argv(plan, tdir)`` is a ``bash`` command line: it starts QEMU with the template's argv (``-incoming
defer``, its RAM file mapped privately, a throw-away disk overlay from ``-snapshot``), drives QMP over a
pipe (capabilities, ``migrate-incoming fd:3``), waits for the ``RESUME`` event (the restored guest is
running), prints ``hello`` and quits QEMU. What it leaves out compared with our run: the CLI, the sandbox's
run dir and qcow2 overlay, the agent connection, RESEED and the command itself."""

from __future__ import annotations

import os
import shlex
import tempfile

_QMP_START = (
    '{"execute":"qmp_capabilities"}\n'
    '{"execute":"migrate-set-capabilities","arguments":{"capabilities":'
    '[{"capability":"x-ignore-shared","state":true}]}}\n'
    '{"execute":"migrate-incoming","arguments":{"uri":"fd:3"}}\n'
)


def baseline_argv(plan, tdir: str) -> list[str]:
    """bash argv for one raw restore of the template in ``tdir`` made for ``plan`` (a qemu ``GuestPlan``;
    the backend makes the template first, untimed)."""
    work = os.path.join(tempfile.gettempdir(), f"ak-rawqemu-{os.getpid()}")  # made and removed by each run
    argv = plan.argv(work, os.path.join(tdir, "disk.qcow2"), ram=os.path.join(tdir, "ram"), incoming=True)
    # no pidfile, no QMP socket (QMP is on stdio here), the template disk read through a temporary overlay
    i = argv.index("-qmp")
    argv[i + 1] = "stdio"
    i = argv.index("-pidfile")
    del argv[i:i + 2]
    argv.append("-snapshot")
    script = (
        f"mkdir -p -m 700 {shlex.quote(work)}; trap 'rm -rf {shlex.quote(work)}' EXIT; "
        f"coproc Q {{ exec {shlex.join(argv)} 3<{shlex.quote(os.path.join(tdir, 'state'))} 2>/dev/null; }}; "
        f"printf %s {shlex.quote(_QMP_START)} >&${{Q[1]}}; "
        'while IFS= read -r line <&${Q[0]}; do case $line in *\\"RESUME\\"*) break;; esac; done; '
        'echo hello; printf %s \'{"execute":"quit"}\' >&${Q[1]}; wait $Q_PID 2>/dev/null; exit 0'
    )
    return ["bash", "-c", script]
