"""Admission limits of the HTTP API and MCP server: live sandboxes, concurrent runs and batch sizes, per
caller (``CallerPolicy.max_sandboxes``/``max_runs``/``max_batch``) and for the whole server
(``ServerPolicy.server_max_sandboxes``/``server_max_runs``). Beyond one: ``TooManyRequests`` (429 with
Retry-After), before anything starts."""

from __future__ import annotations

from ..errors import TooManyRequests
from .policy import ServerPolicy


class Admission:
    """Live sandboxes (named + one-shot runs in flight), concurrent runs+execs and batch sizes, per
    tenant and for the whole server. Checked and counted synchronously on the event loop, so two
    requests cannot both take the last slot. Beyond a limit: ``TooManyRequests`` (429, Retry-After)."""

    RETRY_AFTER_S = 1

    def __init__(self, policy: ServerPolicy, store) -> None:
        self.policy = policy
        self._store = store  # () -> Store: opened on first use
        self.runs_by: dict[str, int] = {}
        self.oneshots_by: dict[str, int] = {}
        self.creating_by: dict[str, int] = {}

    def live(self, tenant: str | None = None) -> int:
        store = self._store()
        if tenant is None:
            return store.count() + sum(self.oneshots_by.values()) + sum(self.creating_by.values())
        return store.count(tenant) + self.oneshots_by.get(tenant, 0) + self.creating_by.get(tenant, 0)

    def _refuse(self, what: str) -> None:
        raise TooManyRequests(what, retry_after=self.RETRY_AFTER_S,
                              hint="wait for runs to finish or remove sandboxes, then retry")

    def _check_live(self, tenant: str, n: int) -> None:
        caller = self.policy.for_tenant(tenant)
        named_mine, named_all = self._store().counts(tenant)  # one query for both limits (per /run)
        mine = named_mine + self.oneshots_by.get(tenant, 0) + self.creating_by.get(tenant, 0)
        if mine + n > caller.max_sandboxes:
            self._refuse(f"too many live sandboxes for this caller (limit {caller.max_sandboxes})")
        every = named_all + sum(self.oneshots_by.values()) + sum(self.creating_by.values())
        if every + n > self.policy.server_max_sandboxes:
            self._refuse(f"too many live sandboxes on this server (limit {self.policy.server_max_sandboxes})")

    def runs(self, tenant: str, n: int, *, oneshot: bool, batch: bool = False) -> Ticket:
        """Admit ``n`` runs (``oneshot``: each in a fresh sandbox) or execs now, or refuse with 429. The
        returned ticket holds them until it is released (it is a context manager too)."""
        caller = self.policy.for_tenant(tenant)
        if batch and n > caller.max_batch:
            self._refuse(f"a batch of {n} commands is above this caller's limit of {caller.max_batch}")
        if self.runs_by.get(tenant, 0) + n > caller.max_runs:
            self._refuse(f"too many concurrent runs for this caller (limit {caller.max_runs})")
        if sum(self.runs_by.values()) + n > self.policy.server_max_runs:
            self._refuse(f"too many concurrent runs on this server (limit {self.policy.server_max_runs})")
        if oneshot:
            self._check_live(tenant, n)
        counters = [self.runs_by, self.oneshots_by] if oneshot else [self.runs_by]
        return Ticket(counters, tenant, n)

    def creating(self, tenant: str) -> Ticket:
        """Admit one named sandbox being created (it counts as live until the store holds it)."""
        self._check_live(tenant, 1)
        return Ticket([self.creating_by], tenant, 1)


class Ticket:
    """Admitted work, counted from admission until ``release`` (idempotent) or the end of a ``with``."""

    def __init__(self, counters: list[dict[str, int]], tenant: str, n: int) -> None:
        self._counters, self._tenant, self._n = counters, tenant, n
        for c in counters:
            c[tenant] = c.get(tenant, 0) + n

    def release(self) -> None:
        for c in self._counters:
            c[self._tenant] -= self._n
        self._counters = []

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
