"""How big a warm pool should be and how many members it should be starting, from observed demand.

Pure (no I/O, no clock, no asyncio): ``WarmPool`` feeds it events with the current time and asks it for a
``Decision``; tests replay simulated demand traces through it.

The model (Little's law): a member consumed now is replaced after ``lead`` seconds (the refill delay plus
the engine's observed start time), so to serve ``rate`` acquires per second from ready members the pool
must hold about ``rate * lead`` ready members and keep ``rate * start_s`` starts in flight. Both are
raised by a headroom factor for bursts and bounded by the pool's ``max_size`` (members alive) and
``max_starts`` (starts at once). With no demand for ``idle_s`` the target falls back to ``min_size`` and
the surplus ready members are released. When the demand exceeds what ``max_starts`` concurrent starts
can supply (``max_starts / start_s`` per second) - or the pool is capped below what the demand needs -
the pool says it cannot keep up and why.
"""

from __future__ import annotations

import collections
import math

WINDOW_S = 10.0  # demand is measured over this trailing window
FAST_S = 2.0  # ... and over this short one: a step up in demand is seen within seconds, a fall over WINDOW_S
MIN_SPAN_S = 0.2  # the shortest span a rate is measured over (2+ acquires): a back-to-back loop is seen in ~0.2 s
HEADROOM = 1.5  # ready members above the Little's-law estimate (bursts, start-time jitter)
IDLE_S = 60.0  # no acquire for this long: shrink to min_size
START_GUESS_S = 0.5  # start time assumed before the first start is observed
EWMA = 0.3  # weight of the newest start time
BUSY_RATE = 2.0  # acquires/s above which replacements start at once (no refill delay)
HIT_WINDOW = 50  # hit rate over the last N acquires
HIT_RECENT_S = 30.0  # ... that happened within this many seconds (an overload long past says nothing now)


class Decision:
    __slots__ = ("concurrency", "keeping_up", "launch", "note", "refill_delay_s", "shrink", "target_ready")

    def __init__(self, target_ready: int, concurrency: int, launch: int, shrink: int, refill_delay_s: float,
                 keeping_up: bool, note: str | None) -> None:
        self.target_ready = target_ready  # ready members to aim for
        self.concurrency = concurrency  # starts allowed in flight for this pool
        self.launch = launch  # starts to begin now
        self.shrink = shrink  # surplus ready members to release now (idle)
        self.refill_delay_s = refill_delay_s  # how long after a hit to start its replacement
        self.keeping_up = keeping_up
        self.note = note  # why it cannot keep up (None when it can)

    def __repr__(self) -> str:
        return (f"Decision(target_ready={self.target_ready}, concurrency={self.concurrency}, launch={self.launch}, "
                f"shrink={self.shrink}, keeping_up={self.keeping_up})")


class PoolPolicy:
    """Observed demand and refill times of one pool, and the sizing decisions that follow from them."""

    def __init__(self, *, min_size: int, max_size: int, max_starts: int, refill_delay_s: float = 0.15,
                 idle_s: float = IDLE_S) -> None:
        self.min_size, self.max_size, self.max_starts = min_size, max_size, max(1, max_starts)
        self.refill_delay_s = refill_delay_s
        self.idle_s = idle_s
        self._acquires: collections.deque[float] = collections.deque()
        self._hits: collections.deque[tuple[float, bool]] = collections.deque(maxlen=HIT_WINDOW)
        self._starts: collections.deque[float] = collections.deque()
        self.start_s: float | None = None
        self.last_acquire: float | None = None
        self.peak_in_use = 0

    # -- observations --
    def on_acquire(self, now: float, hit: bool, in_use: int) -> None:
        self._acquires.append(now)
        self._hits.append((now, hit))
        self.last_acquire = now
        self.peak_in_use = max(self.peak_in_use, in_use)
        self._trim(now)

    def on_started(self, now: float, seconds: float) -> None:
        self._starts.append(now)
        self.start_s = seconds if self.start_s is None else (1 - EWMA) * self.start_s + EWMA * seconds
        self._trim(now)

    def _trim(self, now: float) -> None:
        for q in (self._acquires, self._starts):
            while q and now - q[0] > WINDOW_S:
                q.popleft()

    # -- measures --
    def demand(self, now: float) -> float:
        """Acquires per second: the higher of the rate over the trailing window and over its last FAST_S
        seconds (fast attack, slow decay: a burst is answered at once, a lull does not shrink the pool).
        The short rate is measured from the first of its acquires to now, over at least MIN_SPAN_S once
        there are two (one acquire is not a rate): a loop of runs back to back is seen after its first few
        runs, not after a second of misses."""
        self._trim(now)
        if not self._acquires:
            return 0.0
        span = max(1.0, min(WINDOW_S, now - self._acquires[0]))
        recent = 0
        for t in reversed(self._acquires):
            if now - t > FAST_S:
                break
            recent += 1
        floor = MIN_SPAN_S if recent >= 2 else 1.0
        fast_span = max(floor, min(FAST_S, now - self._acquires[-recent])) if recent else FAST_S
        return max(len(self._acquires) / span, recent / fast_span)

    def refill_rate(self, now: float) -> float:
        """Members started per second over the trailing window."""
        self._trim(now)
        if not self._starts:
            return 0.0
        return len(self._starts) / max(1.0, min(WINDOW_S, now - self._starts[0]))

    def hit_rate(self, now: float | None = None) -> float | None:
        """Over the last HIT_WINDOW acquires (with ``now``: only those of the last HIT_RECENT_S seconds)."""
        hs = [h for t, h in self._hits if now is None or now - t <= HIT_RECENT_S]
        return round(sum(hs) / len(hs), 3) if hs else None

    def _recent_hits(self, now: float) -> int:
        return sum(1 for t, _ in self._hits if now - t <= HIT_RECENT_S)

    def capacity(self) -> float:
        """Starts per second the engine can sustain within max_starts (at the observed start time)."""
        return self.max_starts / (self.start_s or START_GUESS_S)

    # -- the decision --
    def decide(self, now: float, *, ready: int, starting: int, in_use: int) -> Decision:
        rate = self.demand(now)
        start_s = self.start_s or START_GUESS_S
        idle = self.last_acquire is None or now - self.last_acquire > self.idle_s
        busy = rate >= BUSY_RATE
        delay = 0.0 if busy else self.refill_delay_s
        if idle:
            self.peak_in_use = in_use
            target = self.min_size
            concurrency = min(self.max_starts, max(1, self.min_size))
        else:
            lead = start_s + delay
            target = max(self.min_size, math.ceil(rate * lead * HEADROOM))
            concurrency = max(1, min(self.max_starts, math.ceil(rate * start_s * HEADROOM)))
        room = self.max_size - (ready + starting + in_use)
        target = max(0, min(target, self.max_size - in_use))
        launch = max(0, min(target - ready - starting, concurrency - starting, room))
        shrink = max(0, ready - max(self.min_size, target)) if idle else 0
        note = None
        if not idle and rate > 0:
            need_alive = max(in_use, self.peak_in_use) + math.ceil(rate * (start_s + delay))
            if rate > self.capacity():
                note = (f"demand {rate:.1f}/s exceeds what {self.max_starts} concurrent starts of "
                        f"{start_s * 1e3:.0f} ms can supply ({self.capacity():.1f}/s): raise --max-starts "
                        "or use a faster backend")
            elif need_alive > self.max_size:
                note = (f"demand {rate:.1f}/s with up to {max(in_use, self.peak_in_use)} in use needs about "
                        f"{need_alive} members alive; --pool-max is {self.max_size}")
            elif self._recent_hits(now) >= HIT_WINDOW // 2 and (self.hit_rate(now) or 0) < 0.9:
                note = (f"recent hit rate {self.hit_rate(now)}: members are consumed faster than the engine starts "
                        f"them ({self.max_starts} concurrent starts of {start_s * 1e3:.0f} ms: "
                        f"{self.capacity():.1f}/s); raise --max-starts or use a faster backend")
        return Decision(target, concurrency, launch, shrink, delay, note is None, note)

    def status(self, now: float) -> dict:
        return {"demand_per_s": round(self.demand(now), 2), "refill_per_s": round(self.refill_rate(now), 2),
                "start_ms_avg": round(self.start_s * 1e3, 1) if self.start_s is not None else None,
                "capacity_per_s": round(self.capacity(), 2), "recent_hit_rate": self.hit_rate(now)}
