"""Adaptive rate limiting for messages mode: admit requests in FIFO order, below every known limit.

A request is admitted when all of these allow it:

* the concurrency window — at most `window` requests in flight. It starts at the job's
  `concurrency`, halves on a 429/529 and grows back by one per window's worth of successes (AIMD);
* the user's caps (`rpm`, `tpm`) — at most that many requests / tokens in any 60 seconds. A request
  reserves its estimated input tokens plus its `max_tokens` (as the API itself does for output
  limits) and is settled to the usage its reply reports;
* the server's limits — every reply's `anthropic-ratelimit-*-limit`, `-remaining` and `-reset`
  headers (or, when a gateway sends none of those, the OpenAI-style `x-ratelimit-limit|remaining|
  reset-requests` and `-tokens`, reset a duration such as `1.5s` or `6m0s`), read as the API's token
  buckets: `remaining` now, refilling steadily until the bucket is full at `reset`. What the bucket
  holds is used at once (less a sliver kept back, `SLACK`, for counts a moment old); when too little
  is left, the request waits until enough has refilled, so requests then go at the refill rate and the
  server refuses nothing. Only the newest reply's headers count (a late reply to an older request
  carries older news);
* one shared cooldown after a 429/529, as long as its `retry-after` says.

Only the request at the head of the queue waits for these; the others queue behind it, in arrival
order, except that a request refused with 429/529 is sent again before any request not sent yet.
"""
from __future__ import annotations

import asyncio
import collections
import datetime as dt
import heapq
import itertools
import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

SPAN = 60.0          # the user's caps are per minute (tests scale this down; not a setting)
MAX_RESET = 60.0     # a reset further away counts as this far (clock skew, odd gateways)
MAX_RESET_DURATION = 3600.0   # the same for a reset given as a duration ("6m0s": no clock involved)
SLACK = 0.02         # of a server limit, at most one request's worth, kept back (see ServerQuota.delay)

# server limit name in the headers -> which of a request's costs it counts
SERVER_LIMITS = {"requests": "requests", "tokens": "tokens", "input-tokens": "input", "output-tokens": "output"}
OPENAI_LIMITS = ("requests", "tokens")   # the x-ratelimit-*-<name> headers some gateways send instead


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
    """What the last reply said about one of the server's limits, read as the API's limits work: a
    token bucket holding `remaining` when the reply was made, refilling steadily until it is full
    (`limit`) at `reset_at`."""
    limit: Optional[float]
    remaining: float
    seen_at: float
    reset_at: float
    used: float          # our reservations since (in flight or sent after that reply)

    def delay(self, cost: float, now: float, active: int) -> float:
        """Seconds until `cost` fits what the bucket holds by then, less what we sent since the reply:
        nothing while it fits (a full bucket is used at once), else the time it takes to refill."""
        if cost <= 0:
            return 0.0
        if not self.limit or self.limit <= self.remaining or self.reset_at <= self.seen_at:
            rate = 0.0                                   # full, or how fast it refills is unknown
        else:
            rate = (self.limit - self.remaining) / (self.reset_at - self.seen_at)
        available = self.remaining + rate * max(0.0, min(now, self.reset_at) - self.seen_at) - self.used
        # keep a little back: a reply's count can be a moment old when the next request arrives
        need = cost + (min(cost, SLACK * self.limit) if self.limit else 0.0)
        if available >= need:
            return 0.0
        if rate > 0 and now < self.reset_at:
            return (need - available) / rate             # until enough has refilled
        # what the server allows now is unknown until a reply tells: one request at a time
        return 0.0 if active == 0 else math.inf


class RateLimiter:
    def __init__(self, concurrency: int, rpm: Optional[int] = None, tpm: Optional[int] = None, *,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time):
        self.max_window = float(concurrency)
        self.window = float(concurrency)
        self.clock, self.wall = clock, wall
        self.caps = {k: SlidingWindow(v, SPAN) for k, v in (("requests", rpm), ("tokens", tpm)) if v}
        self.server: dict[str, ServerQuota] = {}
        self.in_flight: dict = collections.Counter()    # cost name -> reserved by requests in flight
        self.cooldown_until = 0.0
        self.last_decrease = float("-inf")
        self.refusals = 0
        self.waited = 0.0                               # seconds the head waited for quota (not for a slot)
        self.progress_at = clock()                      # the last reply that was not a refusal (or the start)
        self._observed = float("-inf")                  # when the request whose headers we hold was sent
        self._queue: list = []                          # heap of waiting requests' (rank, arrival)
        self._arrivals = itertools.count()
        self._changed = asyncio.Event()

    @property
    def active(self) -> int:
        return self.in_flight["requests"]

    # ---- admission ---------------------------------------------------------------------------
    async def acquire(self, input_tokens: int, max_tokens: int, *, again: bool = False) -> Ticket:
        """Wait for this request's turn, then for quota. Turns go in arrival order, except that a
        request refused with 429/529 (`again`) goes before any not sent yet: else it could lose the
        first free slot after every cooldown to a newer one, and be refused until it gives up."""
        costs = {"requests": 1, "input": input_tokens, "output": max_tokens, "tokens": input_tokens + max_tokens}
        me = (0 if again else 1, next(self._arrivals))
        heapq.heappush(self._queue, me)
        try:
            while True:
                now = self.clock()
                wait = None      # not our turn, or the window is full: until something changes
                if self._queue[0] == me and self.active < max(1, int(self.window)):
                    wait = self._delay(costs, now)
                    if wait <= 0:
                        break
                self._changed.clear()
                try:     # until the wait is over, or something changed (a reply, a slot freed, a turn)
                    await asyncio.wait_for(self._changed.wait(), None if wait in (None, math.inf) else wait)
                except asyncio.TimeoutError:
                    pass
                if wait is not None:     # the head waited for quota (not for a free slot)
                    self.waited += self.clock() - now
        finally:
            self._queue.remove(me)
            heapq.heapify(self._queue)
            self._changed.set()                         # the next in line
        ticket = Ticket(costs, now, {k: w.take(costs[k], now) for k, w in self.caps.items()})
        self.in_flight.update(costs)
        for name, quota in self.server.items():
            quota.used += costs[SERVER_LIMITS[name]]
        return ticket

    def _delay(self, costs: dict, now: float) -> float:
        waits = [self.cooldown_until - now]
        waits += [w.delay(costs[k], now) for k, w in self.caps.items()]
        waits += [q.delay(costs[SERVER_LIMITS[n]], now, self.active) for n, q in self.server.items()]
        return max(waits)

    # ---- feedback ----------------------------------------------------------------------------
    def release(self, ticket: Ticket, *, headers: Optional[Mapping] = None, usage: Optional[Mapping] = None,
                refused_for: Optional[float] = None) -> None:
        """A request is over. `usage` from its reply; `refused_for` = its retry-after on a 429/529."""
        now = self.clock()
        self.in_flight.subtract(ticket.costs)
        if headers is not None and ticket.sent_at >= self._observed:   # not older news than what we hold
            self._observed = ticket.sent_at
            self._observe(headers, now)
        if usage is not None:
            self.progress_at = now
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
        """Read the server's limits from a reply: `anthropic-ratelimit-<limit>-limit|remaining|reset`
        (reset an RFC 3339 time), or when those are absent the OpenAI-style headers that gateways such
        as LiteLLM send, `x-ratelimit-limit|remaining|reset-requests` and `-tokens` (reset a duration:
        "1.5s", "6m0s", "250ms", or plain seconds)."""
        for name, cost in SERVER_LIMITS.items():
            remaining = _number(headers.get(f"anthropic-ratelimit-{name}-remaining"))
            reset_in = self._seconds_until(headers.get(f"anthropic-ratelimit-{name}-reset"))
            limit = _number(headers.get(f"anthropic-ratelimit-{name}-limit"))
            if (remaining is None or reset_in is None) and name in OPENAI_LIMITS:
                remaining = _number(headers.get(f"x-ratelimit-remaining-{name}"))
                reset_in = parse_duration(headers.get(f"x-ratelimit-reset-{name}"))
                reset_in = None if reset_in is None else min(reset_in, MAX_RESET_DURATION)
                limit = _number(headers.get(f"x-ratelimit-limit-{name}"))
            elif reset_in is not None:
                reset_in = min(reset_in, MAX_RESET)
            if remaining is None or reset_in is None:
                continue
            self.server[name] = ServerQuota(limit, remaining, now, now + reset_in, float(self.in_flight[cost]))

    def stalled(self) -> float:
        """Seconds since the last reply that was not a refusal (or since the start)."""
        return self.clock() - self.progress_at

    def _seconds_until(self, value: Optional[str]) -> Optional[float]:
        if not value:
            return None
        try:
            when = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return parse_duration(value)     # some gateways send seconds, or a duration
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        return max(0.0, when.timestamp() - self.wall())


_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")


def parse_duration(value: Optional[str]) -> Optional[float]:
    """Seconds in a reset value: plain seconds ("17", "0.5") or a Go-style duration as OpenAI-style
    headers give it ("1.5s", "6m0s", "1m30.5s", "250ms", "1h2m"); None if it is neither."""
    if value is None:
        return None
    text = str(value).strip().lower()
    seconds = _number(text)
    if seconds is not None:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _used_tokens(usage: Mapping) -> float:
    """Tokens a reply counts against a tokens-per-minute cap (cache reads are not counted)."""
    return float(sum(usage.get(k) or 0 for k in ("input_tokens", "cache_creation_input_tokens", "output_tokens")))


def _number(value) -> Optional[float]:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
