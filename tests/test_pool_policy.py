"""The adaptive pool's decisions (agentkernel.pool_policy), replayed on simulated demand traces: a
discrete-time pool whose engine takes ``start_s`` per member, consumed by clients issuing runs back to
back. No engine, no clock: the decisions alone."""

from __future__ import annotations

from agentkernel.pool_policy import PoolPolicy

DT = 0.005


class Sim:
    """A pool driven only by the policy's decisions, as WarmPool drives it."""

    def __init__(self, policy: PoolPolicy, start_s: float) -> None:
        self.p = policy
        self.start_s = start_s
        self.t = 0.0
        self.ready = 0
        self.starts: list[float] = []  # finish times of starts in flight
        self.in_use = 0
        self.acquires: list[tuple[float, bool]] = []
        self.decisions = []

    def step_engine(self) -> None:
        done = [f for f in self.starts if f <= self.t]
        for f in done:
            self.starts.remove(f)
            self.ready += 1
            self.p.on_started(self.t, self.start_s)

    def plan(self) -> None:
        d = self.p.decide(self.t, ready=self.ready, starting=len(self.starts), in_use=self.in_use)
        self.decisions.append((self.t, d))
        assert d.target_ready <= self.p.max_size and 1 <= d.concurrency <= self.p.max_starts
        alive = self.ready + len(self.starts) + self.in_use
        assert alive + d.launch <= max(self.p.max_size, alive)
        self.starts += [self.t + self.start_s] * d.launch
        self.ready -= d.shrink

    def run(self, clients: int, run_s: float, until: float, think_s: float = 0.0) -> None:
        """``clients`` each acquire, run for ``run_s``, then acquire again after ``think_s``, until ``until``."""
        state = [(self.t, False) for _ in range(clients)]  # (time of next event, running?)
        waiting_since: dict[int, float] = {}
        next_plan = self.t
        while self.t < until:
            self.step_engine()
            for i, (at, running) in enumerate(state):
                if at > self.t:
                    continue
                if running:
                    self.in_use -= 1
                    state[i] = (self.t + think_s, False)
                    continue
                if self.ready:
                    self.ready -= 1
                    self.in_use += 1
                    hit = i not in waiting_since
                    waiting_since.pop(i, None)
                    self.acquires.append((self.t, hit))
                    self.p.on_acquire(self.t, hit, self.in_use)
                    state[i] = (self.t + run_s, True)
                    self.plan()
                elif i not in waiting_since:
                    waiting_since[i] = self.t
                    self.plan()
            if self.t >= next_plan:  # the daemon's maintenance tick
                self.plan()
                next_plan = self.t + 1.0
            self.t += DT

    def idle(self, seconds: float) -> None:
        end = self.t + seconds
        while self.t < end:
            self.step_engine()
            self.plan()
            self.t += 0.5

    def hit_rate(self, since: float) -> float:
        xs = [h for t, h in self.acquires if t >= since]
        return sum(xs) / len(xs)


def static_policy_hit_rate(start_s: float, clients: int, run_s: float) -> float:
    """The old fixed pool (refill to min 2, 2 starts at once, 150 ms refill delay) on the same trace."""
    p = PoolPolicy(min_size=2, max_size=8, max_starts=2)
    p.decide = _static(p)  # type: ignore[method-assign]
    s = Sim(p, start_s)
    s.run(clients, run_s, until=20.0)
    return s.hit_rate(since=5.0)


def _static(p: PoolPolicy):
    from agentkernel.pool_policy import Decision

    def decide(now, *, ready, starting, in_use):
        launch = max(0, min(2 - ready - starting, 2 - starting, p.max_size - ready - starting - in_use))
        return Decision(2, 2, launch, 0, 0.15, True, None)

    return decide


def test_sequential_back_to_back_keeps_hit_rate_when_the_engine_can():
    # one client, 20 ms per run (50/s), 60 ms starts: 3 starts in flight suffice, max_starts is 4
    p = PoolPolicy(min_size=2, max_size=32, max_starts=4)
    s = Sim(p, start_s=0.06)
    s.run(clients=1, run_s=0.02, until=20.0)
    assert s.hit_rate(since=5.0) >= 0.9
    d = s.decisions[-1][1]
    assert d.keeping_up and d.note is None
    assert 30 <= p.demand(s.t) <= 55  # ~40/s: 20 ms runs on a 5 ms clock
    assert d.refill_delay_s == 0.0  # busy: replacements start at once
    assert static_policy_hit_rate(0.06, 1, 0.02) < 0.9  # the fixed pool drains on the same trace


def test_back_to_back_loop_hits_from_its_first_runs():
    # a fresh pool (min 2 ready) meets a loop of 25 ms runs with 60 ms starts: the demand is seen within
    # the first few runs (not after a second of misses), so the hit rate over the loop's first 200 runs,
    # counted from its very first, stays >= 0.9
    p = PoolPolicy(min_size=2, max_size=32, max_starts=4)
    s = Sim(p, start_s=0.06)
    s.ready = 2
    s.run(clients=1, run_s=0.025, until=6.0)
    first = [h for _, h in s.acquires][:200]
    assert len(first) >= 150 and sum(first) / len(first) >= 0.9
    assert sum(first[:20]) >= 15
    busy_at = next(t for t, d in s.decisions if d.refill_delay_s == 0.0)
    assert busy_at < 0.2


def test_two_acquires_far_apart_are_not_a_burst():
    p = PoolPolicy(min_size=2, max_size=32, max_starts=4)
    p.on_acquire(10.0, True, 1)
    assert p.demand(10.0) <= 1.0  # one acquire is not a rate
    p.on_acquire(11.5, True, 1)
    assert p.demand(11.5) < 2.0  # a person's two runs 1.5 s apart: replacements still wait the refill delay
    assert p.decide(11.5, ready=1, starting=0, in_use=1).refill_delay_s > 0


def test_concurrent_load_grows_the_pool_and_its_starts():
    # 10 clients, 200 ms runs (~50/s), 100 ms starts
    p = PoolPolicy(min_size=2, max_size=32, max_starts=8)
    s = Sim(p, start_s=0.1)
    s.run(clients=10, run_s=0.2, until=20.0)
    assert s.hit_rate(since=5.0) >= 0.9
    late = [d for t, d in s.decisions if t >= 5.0]
    assert max(d.target_ready for d in late) > 2 and max(d.concurrency for d in late) > 2
    assert all(d.concurrency <= 8 and d.target_ready <= 32 for _, d in s.decisions)


def test_slow_engine_says_it_cannot_keep_up():
    # 400 ms starts, at most 2 at once: 5 members/s, while one client could run 100/s
    p = PoolPolicy(min_size=2, max_size=32, max_starts=2)
    s = Sim(p, start_s=0.4)
    s.run(clients=1, run_s=0.01, until=20.0)
    d = s.decisions[-1][1]
    assert not d.keeping_up
    assert "--max-starts" in d.note
    assert p.status(s.t)["capacity_per_s"] == 5.0


def test_pool_max_too_small_is_named():
    p = PoolPolicy(min_size=2, max_size=8, max_starts=16)
    s = Sim(p, start_s=0.1)
    s.run(clients=10, run_s=0.05, until=10.0)
    d = s.decisions[-1][1]
    assert not d.keeping_up and "--pool-max is 8" in d.note
    assert all(s_ <= 8 for s_ in [d.target_ready for _, d in s.decisions])


def test_idle_pool_shrinks_to_min():
    p = PoolPolicy(min_size=2, max_size=32, max_starts=8, idle_s=30.0)
    s = Sim(p, start_s=0.1)
    s.run(clients=10, run_s=0.2, until=10.0)
    s.run(clients=0, run_s=0.2, until=10.5)  # let the last runs finish
    grown = s.ready
    assert grown > 2
    s.idle(20.0)  # not yet idle long enough: keeps its size
    assert s.ready == grown
    s.idle(20.0)
    assert s.ready == 2 and s.decisions[-1][1].target_ready == 2
    assert s.decisions[-1][1].refill_delay_s == 0.15  # quiet again: replacements wait for the command


def test_no_demand_keeps_min_size_warm():
    p = PoolPolicy(min_size=3, max_size=8, max_starts=2)
    s = Sim(p, start_s=0.2)
    s.idle(5.0)
    assert s.ready == 3 and not s.starts


def test_demand_steps_up_and_down_and_the_pool_follows():
    # a trace with phases: one client, then a burst of 10, then one again; 100 ms starts, 8 at once
    p = PoolPolicy(min_size=2, max_size=32, max_starts=8, idle_s=30.0)
    s = Sim(p, start_s=0.1)
    s.run(clients=1, run_s=0.05, until=10.0)
    quiet_target = max(d.target_ready for t, d in s.decisions if 5.0 <= t < 10.0)
    s.run(clients=10, run_s=0.2, until=25.0)
    burst = [d for t, d in s.decisions if 15.0 <= t < 25.0]
    s.run(clients=1, run_s=0.05, until=45.0)
    after = [d for t, d in s.decisions if 40.0 <= t < 45.0]
    assert s.hit_rate(since=5.0) >= 0.9  # over the whole trace, step changes included
    assert max(d.target_ready for d in burst) > quiet_target  # grew for the burst
    assert max(d.target_ready for d in after) < max(d.target_ready for d in burst)  # and came back down
    assert all(d.keeping_up for d in burst[len(burst) // 2:] + after)


def test_overload_is_reported_and_clears_when_demand_falls():
    # 300 ms starts, 2 at once (6.7/s): 5 clients at 10 ms runs overload it; then 1 client paced at 1 run/s
    p = PoolPolicy(min_size=2, max_size=32, max_starts=2)
    s = Sim(p, start_s=0.3)
    s.run(clients=5, run_s=0.01, until=10.0)
    assert not s.decisions[-1][1].keeping_up and "--max-starts" in s.decisions[-1][1].note
    s.run(clients=1, run_s=0.01, until=40.0, think_s=1.0)
    d = s.decisions[-1][1]
    assert d.keeping_up and d.note is None
    assert s.hit_rate(since=30.0) == 1.0


def test_a_slowing_engine_raises_the_target():
    # the engine's start time doubles mid-trace (a loaded host): the policy's estimate follows and it keeps
    # more members ready to cover the longer lead time
    p = PoolPolicy(min_size=2, max_size=64, max_starts=16)
    s = Sim(p, start_s=0.1)
    s.run(clients=4, run_s=0.1, until=10.0)
    before = [d.target_ready for t, d in s.decisions if 5.0 <= t < 10.0]
    s.start_s = 0.3
    s.run(clients=4, run_s=0.1, until=25.0)
    after = [d.target_ready for t, d in s.decisions if 20.0 <= t < 25.0]
    assert p.start_s is not None and p.start_s > 0.25
    assert max(after) > max(before)
    assert s.hit_rate(since=20.0) >= 0.9
