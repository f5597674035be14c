"""Adaptive rate limiting for messages mode: admit requests in FIFO order, below every known limit.

A request is admitted when all of these allow it:

* the concurrency window — at most `window` requests in flight. It starts at the job's
  `concurrency`, halves on a 429/529 and grows back by one per window's worth of successes (AIMD);
* the user's caps (`rpm`, `tpm`) — at most that many requests / tokens in any 60 seconds. A request
  reserves its estimated input tokens plus its `max_tokens` (as the API itself does for output
  limits) and is settled to the usage its reply reports;
* the server's limits — every reply's `anthropic-ratelimit-*-remaining` and `-reset` headers: what
  is left is spread evenly over the time to the reset once less than a fifth of the limit is left,
  so sending slows down before the server refuses anything; when nothing is left it waits for the
  reset, then sends one request at a time until a reply tells what the server allows again;
* one shared cooldown after a 429/529, as long as its `retry-after` says.

Only the request at the head of the queue waits for these; the others queue behind it.
"""
from __future__ import annotations

import asyncio
import collections
import datetime as dt
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

SPAN = 60.0          # the user's caps are per minute
MAX_RESET = 60.0     # a reset further away counts as this far (clock skew, odd gateways)
LOW_WATER = 0.2      # pace requests once less than this share of a server limit is left

# server limit name in the headers -> which of a request's costs it counts
SERVER_LIMITS = {"requests": "requests", "tokens": "tokens", "input-tokens": "input", "output-tokens": "output"}


@dataclass
class Ticket:
    """One admitted request: what it reserved, and when it was sent."""
    costs: dict
    sent_at: float
    entries: dict = field(default_factory=dict)   # its entries in the user's windows, to settle


class SlidingWindow:
    """At most `limit` units in any `span` seconds (a log of what was admitted, settled later)."""

    def __init__(self, limit: float, span: float = SPAN):
        self.limit, self.span = limit, span
        self.log: collections.deque = collections.deque()   # [time, amount] entries, oldest first
        self.total = 0.0

    def _expire(self, now: float) -> None:
        while self.log and self.log[0][0] <= now - self.span:
            self.total -= self.log.popleft()[1]

    def delay(self, amount: float, now: float) -> float:
        """Seconds until `amount` fits (a request larger than the limit fits an empty window)."""
        self._expire(now)
        excess = self.total + amount - self.limit
        if excess <= 0 or not self.log:
            return 0.0
        for when, used in self.log:          # wait until enough of the oldest entries expire
            excess -= used
            if excess <= 0:
                return when + self.span - now
        return self.log[-1][0] + self.span - now

    def take(self, amount: float, now: float) -> list:
        entry = [now, amount]
        self.log.append(entry)
        self.total += amount
        return entry

    def settle(self, entry: list, actual: float, now: float) -> None:
        """Replace a reservation by what was really used (if it is still in the window)."""
        self._expire(now)
        if entry[0] > now - self.span:
            self.total += actual - entry[1]
            entry[1] = actual


@dataclass
class ServerQuota:
    """What the last reply said about one of the server's limits."""
    limit: Optional[float]
    remaining: float
    reset_at: float
    used: float          # our reservations since (in flight or sent after that reply)

    def delay(self, cost: float, now: float, last_sent: float, active: int) -> float:
        if cost <= 0:
            return 0.0
        left = self.reset_at - now
        if left <= 0:
            # Past the reset, what the server allows is unknown until a reply tells (a bucket is full
            # again, a sliding window has freed a slot): one request at a time until then.
            return 0.0 if active == 0 else math.inf
        available = self.remaining - self.used
        if available < cost:
            return left                                  # nothing left: wait for the reset
        if self.limit and available - cost >= LOW_WATER * self.limit:
            return 0.0                                   # plenty left: no need to pace
        gap = left * cost / available                    # spread what is left over the time left
        return max(0.0, last_sent + gap - now)


class RateLimiter:
    def __init__(self, concurrency: int, rpm: Optional[int] = None, tpm: Optional[int] = None, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.max_window = float(concurrency)
        self.window = float(concurrency)
        self.clock, self.wall = clock, wall
        self.caps = {k: SlidingWindow(v) for k, v in (("requests", rpm), ("tokens", tpm)) if v}
        self.server: dict[str, ServerQuota] = {}
        self.in_flight: dict = collections.Counter()    # cost name -> reserved by requests in flight
        self.cooldown_until = 0.0
        self.last_decrease = float("-inf")
        self.last_sent = float("-inf")
        self.refusals = 0
        self.waited = 0.0                               # seconds the head of the queue waited for quota
        self._fifo = asyncio.Lock()                     # FIFO: waiters acquire in arrival order
        self._changed = asyncio.Event()

    @property
    def active(self) -> int:
        return self.in_flight["requests"]

    # ---- admission ---------------------------------------------------------------------------
    async def acquire(self, input_tokens: int, max_tokens: int) -> Ticket:
        costs = {"requests": 1, "input": input_tokens, "output": max_tokens, "tokens": input_tokens + max_tokens}
        async with self._fifo:
            started = self.clock()
            while True:
                now = self.clock()
                wait = self._delay(costs, now) if self.active < max(1, int(self.window)) else None
                if wait is not None and wait <= 0:
                    break
                self._changed.clear()
                try:     # until the wait is over, or something changed (a reply, a slot freed)
                    await asyncio.wait_for(self._changed.wait(), None if wait in (None, math.inf) else wait)
                except asyncio.TimeoutError:
                    pass
            self.waited += now - started
            ticket = Ticket(costs, now, {k: w.take(costs[k], now) for k, w in self.caps.items()})
            self.in_flight.update(costs)
            for name, quota in self.server.items():
                quota.used += costs[SERVER_LIMITS[name]]
            self.last_sent = now
            return ticket

    def _delay(self, costs: dict, now: float) -> float:
        waits = [self.cooldown_until - now]
        waits += [w.delay(costs[k], now) for k, w in self.caps.items()]
        waits += [q.delay(costs[SERVER_LIMITS[n]], now, self.last_sent, self.active) for n, q in self.server.items()]
        return max(waits)

    # ---- feedback ----------------------------------------------------------------------------
    def release(self, ticket: Ticket, *, headers: Optional[Mapping] = None, usage: Optional[Mapping] = None,
                refused_for: Optional[float] = None) -> None:
        """A request is over. `usage` from its reply; `refused_for` = its retry-after on a 429/529."""
        now = self.clock()
        self.in_flight.subtract(ticket.costs)
        if headers is not None:
            self._observe(headers, now)
        if refused_for is not None:
            self.refusals += 1
            self.cooldown_until = max(self.cooldown_until, now + refused_for)
            if ticket.sent_at > self.last_decrease:          # one decrease per congestion event
                self.window = max(1.0, self.window / 2)
                self.last_decrease = now
        elif usage is not None:
            self.window = min(self.max_window, self.window + 1 / self.window)
        if "tokens" in ticket.entries:      # settle the reservation (a failed request used nothing)
            actual = _used_tokens(usage) if usage is not None else 0.0
            self.caps["tokens"].settle(ticket.entries["tokens"], actual, now)
        self._changed.set()

    def _observe(self, headers: Mapping, now: float) -> None:
        for name, cost in SERVER_LIMITS.items():
            remaining = _number(headers.get(f"anthropic-ratelimit-{name}-remaining"))
            reset_in = self._seconds_until(headers.get(f"anthropic-ratelimit-{name}-reset"))
            if remaining is None or reset_in is None:
                continue
            limit = _number(headers.get(f"anthropic-ratelimit-{name}-limit"))
            self.server[name] = ServerQuota(limit, remaining, now + min(reset_in, MAX_RESET),
                                            float(self.in_flight[cost]))

    def _seconds_until(self, value: Optional[str]) -> Optional[float]:
        if not value:
            return None
        try:
            when = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return _number(value)     # some gateways send seconds
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        return max(0.0, when.timestamp() - self.wall())


def _used_tokens(usage: Mapping) -> float:
    """Tokens a reply counts against a tokens-per-minute cap (cache reads are not counted)."""
    return float(sum(usage.get(k) or 0 for k in ("input_tokens", "cache_creation_input_tokens", "output_tokens")))


def _number(value) -> Optional[float]:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
