"""Messages mode: every pending row is sent as its own `POST /v1/messages`, many at once.

For gateways without the batch endpoints, and for runs that cannot wait for a batch. Pending rows
are read from the state a page at a time (memory does not grow with the job), sent by
`concurrency` workers over an httpx AsyncClient, admitted by the adaptive rate limiter
(`ratelimit.py`), and each reply is committed as soon as it arrives.

Rows are never marked in flight: a run killed mid-way loses only the requests on the wire (at most
`concurrency`), which the next run sends again; a row whose reply was recorded is never sent again.
The Messages API has no idempotency key, so those few are the only requests that can be paid twice.

Errors, per request, by the one rule both modes follow (`errors.error_class`):

* about the request (`invalid_request_error`, 413 `request_too_large`): the row ends errored (final);
* 429 / 529 (rate limit, overloaded): never use up a row's attempts. Each slows every worker down (the
  limiter's shared cooldown, honouring retry-after, which the refused request waits for too, at the
  head of the queue). The run's patience is the RetryPolicy's `max_elapsed` without a single reply
  that was not a refusal; then the run stops with exit 4, the rows pending;
* no connection at all (refused, DNS, TLS, connect timeout — `UnreachableError`): nothing was
  delivered, so nothing was run or paid: not an attempt; retried with backoff as the RetryPolicy
  allows, then the run stops with exit 4, the rows pending, and the next run sends them;
* a request our own client refused to send (`NotSentError`, a header it cannot write): nothing was
  delivered either, but no retry would help: the run stops with exit 4, the rows pending;
* a timeout or a connection dropped after sending (`NoReplyError`; `api.transport_error` tells the
  two apart, for both modes): the request may have run (and be paid for). It
  counts as an attempt — `max_attempts` is what bounds how often one row can be paid for — and keeps
  its budget reservation as spent; when a row's attempts are all used up this way it ends errored,
  saying its sends may have been paid for;
* other transient replies (5xx, 408, 409): retried as the RetryPolicy allows, and at most
  `max_attempts` sends (a 5xx may have run); they never end a row: the run stops with exit 4, the
  rows pending;
* anything else is not about the request and no retry would help: 401 / 403 / 402, a 404 (a wrong
  base URL or model), a gateway's own 4xx error types (`no_db_connection`…), a reply that is not a
  Message: the run stops at once with exit 4, naming the error, the rows pending.

With max_cost, each request reserves its maximum cost before it is sent, and its reply settles the
reservation to what it cost. A send that may have run without a reply saying what it cost (a timeout, a
dropped connection, a 5xx other than 529) keeps its reservation, counted as spent; sending the request
again reserves again, and when that does not fit the row stays pending for a later run. Only a failure
that proves the request was not run (nothing delivered, any 4xx, or 529) gives the reservation back.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from decimal import Decimal
from typing import Callable, Optional

import tenacity

from .api import CREATE_NOT_CREATED, AsyncClient, asked_wait, asks_past
from .context import BatchContext
from .errors import (ABOUT_REQUEST, SLOW_DOWN, ApiError, GaveUpError, InputError, NoReplyError, NotSentError,
                     TransientApiError, error_class)
from .ratelimit import RateLimiter
from .results import NOT_BILLED, clean_usage
from .states import ANSWERED, ERRORED, IN_FLIGHT, PENDING

log = logging.getLogger("batchrun")

PAGE = 500                    # pending rows read from the state at a time
# Each reply is committed as it arrives: a kill then loses (and the next run pays again for) only
# the requests on the wire, never replies already received. A commit in WAL mode without fsync
# costs ~0.1 ms, far below any API's pace.
FLUSH_ROWS = 1
FLUSH_SECONDS = 0.5           # the progress tick
REPORT_SECONDS = 2.0          # progress
DEFAULT_COOLDOWN = 1.0        # after a 429/529 without retry-after (doubled for each refusal of the same row)
NOT_RUN = CREATE_NOT_CREATED  # replies that prove the request was not processed (408, 409, 429, 529)


class _NoRoom(Exception):
    """Sending a request again (its last send may have run) does not fit what is left of the budget."""


class _RowFailed(Exception):
    """An error that ends this row (a 400, say), but not the job."""

    def __init__(self, error: ApiError):
        super().__init__(str(error))
        self.error = error


class MessagesDriver:
    """Sends one job's pending rows over `POST /v1/messages`. Handed what it needs: the run's context
    (`context.BatchContext`, the one batch mode's drivers share: the job's spec, store and ids, the result
    parser, the budget ledger, `bodies` (planned rows -> (row_index, custom_id, row body): see bodies.py),
    `full_body` (a row body -> the request's params JSON), and the run's counters, whose `requests_sent` it
    adds to), the `client` (an AsyncClient: headers, retry policy, error translation) and `report` (the
    job's counts -> progress). After `run_pending`, `recorded` says how many rows got their result."""

    def __init__(self, ctx: BatchContext, client: AsyncClient, report: Callable[[dict], None]):
        self.ctx = ctx
        self.spec = ctx.spec
        self.store = ctx.store
        self.ledger = ctx.ledger
        self.client = client
        self.report = report
        self.limiter: Optional[RateLimiter] = None
        self._buffer: list = []       # (custom_id, fields, sends) of rows answered, not yet committed
        self.recorded = 0             # rows that got their result in this call
        # with max_cost: what is left of the budget less the maximum of every request on the wire
        self.room: Optional[Decimal] = None
        self.sending = 0
        self.stopped: Optional[InputError] = None   # why the feed stopped early (a row changed since the plan)

    def run_pending(self) -> int:
        """Send every pending row; returns how many rows got their result in this call."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self._run())
        # called from inside an event loop (a notebook): run ours in a thread of its own
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self._run()).result()

    async def _run(self) -> int:
        spec = self.spec
        self.limiter = RateLimiter(spec.concurrency, spec.rpm, spec.tpm)
        if spec.max_cost is not None:
            self.room = self.ledger.left()[0]
        started = time.monotonic()
        queue: asyncio.Queue = asyncio.Queue(maxsize=spec.concurrency)
        async with self.client:
            tasks = [asyncio.create_task(self._feed(queue))]
            tasks += [asyncio.create_task(self._worker(queue)) for _ in range(spec.concurrency)]
            ticker = asyncio.create_task(self._tick())
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()          # the first error (an AuthError, say) stops the job
                if self.stopped is not None:
                    raise self.stopped
            finally:
                for task in (*tasks, ticker):
                    task.cancel()
                await asyncio.gather(*tasks, ticker, return_exceptions=True)
                self._flush()              # replies already received are kept, whatever happened
                self.store.release_claims(self.ctx.job_id)
        log.info("job %s: %d replies recorded in %.1fs over %s; %d refused (429/529), %.1fs waiting on rate limits",
                 self.ctx.short_id, self.recorded, time.monotonic() - started, self.client.what,
                 self.limiter.refusals, self.limiter.waited)
        return self.recorded

    # ---- the pipeline ------------------------------------------------------------------------
    async def _feed(self, queue: asyncio.Queue) -> None:
        last = -1
        while True:
            # chosen and claimed in one transaction: a job sharing these requests never sends them too
            # (their bodies rendered again and checked, or stored: an input changed since the plan stops
            # the run before any of them is sent, and the claims are released)
            try:
                page = list(self.ctx.bodies(self.store.claim_for_messages(self.ctx.job_id, last, PAGE)))
            except InputError as exc:   # a row no longer renders as planned: none of the page is sent, but
                self.stopped = exc      # the requests already on the wire are waited for and recorded
                break
            if not page:
                break
            for _, custom_id, body in page:
                reserved = await self._reserve(body)
                if reserved is None:      # over the budget: send no more (the run says why)
                    page = None
                    break
                await queue.put((custom_id, self.ctx.full_body(body), reserved))
            if page is None:
                break
            last = page[-1][0]
        for _ in range(self.spec.concurrency):
            await queue.put(None)

    async def _worker(self, queue: asyncio.Queue) -> None:
        while (item := await queue.get()) is not None:
            custom_id, body, reserved = item
            tries = {"sent": 0, "unsent": 0, "counted": 0, "refused": 0, "held": reserved, "need": reserved}
            fields = await self._send(body, tries)
            if fields is None:     # not sent again for want of budget: the row stays pending
                self._flush()
                self.ledger.hold(tries["need"], "sending again a request whose last send may have run (no reply)")
            else:
                self._buffer.append((custom_id, fields, tries["sent"]))
                if len(self._buffer) >= FLUSH_ROWS:
                    self._flush()
            self._settle(tries, fields)

    # ---- the budget: each request reserves its maximum cost before it is sent ----------------------
    async def _reserve(self, body: str) -> Optional[Decimal]:
        """Reserve what the request (its stored row body) may cost at most; None (it is not sent) when
        that does not fit what is left of the budget, even once the requests on the wire have settled."""
        if self.room is None:
            return Decimal(0)
        need = self.ledger.estimator.request_max(body)
        while need > self.room and self.sending:   # replies settle their reservations to what they cost
            await asyncio.sleep(0.02)
        if need > self.room:
            self._flush()
            self.ledger.hold(need, "the next request (reserved at its maximum before it is sent)", first=False)
            return None
        self.room -= need
        self.sending += 1
        return need

    def _settle(self, tries: dict, fields: Optional[dict]) -> None:
        """A row is done with: what its last send reserved, less what its reply cost, is free again."""
        if self.room is None:
            return
        held = tries["held"] or Decimal(0)   # None: kept as spent by a send that may have run (_send_failed)
        paid = fields is not None and fields["state"] in ANSWERED
        cost = fields.get("cost_usd") if paid else None
        self.room += held - (Decimal(0) if not paid else held if cost is None else Decimal(str(cost)))
        self.sending -= 1

    def _send_failed(self, tries: dict, error: ApiError) -> None:
        """A send failed: unless it provably was not run, its reservation is counted as spent."""
        if self.room is not None and tries["held"] is not None and not _not_run(error):
            self.ledger.spent_without_reply(tries["held"])
            tries["held"] = None

    def _reserve_again(self, tries: dict) -> None:
        """Before a request is sent again after a send that may have run: its maximum, reserved anew."""
        if self.room is None or tries["held"] is not None:
            return
        if tries["need"] > self.room:
            raise _NoRoom()
        self.room -= tries["need"]
        tries["held"] = tries["need"]

    async def _tick(self) -> None:
        last_report = time.monotonic()
        while True:
            await asyncio.sleep(FLUSH_SECONDS)
            self._flush()
            if time.monotonic() - last_report >= REPORT_SECONDS:
                self._report()
                last_report = time.monotonic()

    def _flush(self) -> None:
        if not self._buffer:
            return
        self.recorded += self.store.record_replies(self.ctx.job_id, self._buffer)
        self._buffer.clear()

    def _report(self) -> None:
        counts = self.store.counts(self.ctx.job_id)
        sending = min(self.limiter.active, counts.get(PENDING, 0))
        if sending:       # show the requests on the wire as in flight (they are pending in the state)
            counts[PENDING] -= sending
            counts[IN_FLIGHT] = counts.get(IN_FLIGHT, 0) + sending
        self.report(counts)

    # ---- one row -----------------------------------------------------------------------------
    async def _send(self, body: str, tries: dict) -> Optional[dict]:
        """Send one row until it has a result: the row's fields (`tries` counts the sends), or None when
        sending it again does not fit the budget. Raises (stopping the run, the row left pending) when
        the service, not the request, keeps failing (see the module's docstring)."""
        content = body.encode("utf-8")
        estimate = (len(body) // 4, int(json.loads(body).get("max_tokens") or 0))   # for the limiter
        policy, max_attempts = self.client.retry, self.spec.max_attempts
        started = time.monotonic()

        def stop(state: tenacity.RetryCallState) -> bool:
            exc = state.outcome.exception()
            if _slows_down(exc):   # the run's patience: time without a reply (or asked to wait past it)
                return self.limiter.stalled() >= policy.max_elapsed or asks_past(exc, self.limiter.stalled(), policy)
            return (tries["counted"] >= max_attempts or state.attempt_number - tries["refused"] > policy.max_retries
                    or time.monotonic() - started >= policy.max_elapsed)

        def wait(state: tenacity.RetryCallState) -> float:
            if _slows_down(state.outcome.exception()):
                return 0.0      # the limiter's shared cooldown holds it, at the head of the queue
            return self.client.retry_wait(state)

        retrying = tenacity.AsyncRetrying(retry=tenacity.retry_if_exception_type(TransientApiError),
                                          wait=wait, stop=stop, reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    self._reserve_again(tries)
                    message = await self._post(content, estimate, tries)
        except _NoRoom:
            return None
        except _RowFailed as exc:       # about the request: the row ends errored
            return _errored(exc.error, tries)
        except TransientApiError as exc:
            if error_class(exc.error_type, exc.status) == ABOUT_REQUEST:
                # about the request, retried as its reply asked (x-should-retry: true, a 409): still the row's
                return _errored(exc, tries)
            if isinstance(exc, NoReplyError) and tries["counted"] >= max_attempts:
                # every attempt may have run (and been paid for) without a reply: the row ends here
                return _errored(exc, tries, " (no reply to any of its sends: they may have run and been paid for)")
            # the service's failure, not the request's: the run stops, this row and the rest stay pending
            raise GaveUpError(f"{exc.message}; gave up after {tries['sent'] + tries['unsent']} tries in "
                              f"{time.monotonic() - started:.0f} s; the rows not answered stay pending and the "
                              f"next run sends them{asked_wait(exc)}", status=exc.status, error_type=exc.error_type,
                              request_id=exc.request_id) from None
        return self.ctx.parser.message(message)

    async def _post(self, content: bytes, estimate: tuple, tries: dict) -> dict:
        """One exchange, admitted by the limiter and reported back to it."""
        ticket = await self.limiter.acquire(*estimate, again=tries["refused"] > 0)
        headers = usage = refused_for = error = None
        try:
            response = await self.client.post_message(content)
            headers = response.headers
            message = self.client.message(response, self.client.what)
            usage = clean_usage(message.get("usage"))[0]
            return message
        except ApiError as exc:
            error = exc
            if isinstance(error, NoReplyError):
                tries["unreplied"] = True      # sent, and no reply: it may have run (and been billed)
            self._send_failed(tries, error)
            if _slows_down(error):
                tries["refused"] += 1
                wait = error.retry_after
                if wait is None or wait <= 0:   # no (or a zero) retry-after: back off more the more often
                    # this row was refused (as the SDK does), never a loop of refusals as fast as they come
                    wait = DEFAULT_COOLDOWN * 2 ** (tries["refused"] - 1)
                refused_for = min(wait, self.client.retry.max_wait)
            raise _classify(error) from None
        finally:
            if isinstance(error, NotSentError):
                tries["unsent"] += 1     # nothing was delivered: not a send, not an attempt
            else:
                tries["sent"] += 1
                self.ctx.counters.requests_sent += 1
                if error is None or not _not_run(error):
                    tries["counted"] += 1
            self.limiter.release(ticket, headers=headers, usage=usage, refused_for=refused_for)


def _classify(error: ApiError) -> Exception:
    """One rule for both modes (errors.error_class): an error about the request ends the row; a
    transient one is retried; any other (401/403, a 404, a gateway's own 4xx) stops the run at once."""
    if error_class(error.error_type, error.status) == ABOUT_REQUEST and not isinstance(error, TransientApiError):
        return _RowFailed(error)
    return error


def _not_run(error: ApiError) -> bool:
    """Whether a send that failed with this error certainly was not run, so not billed: nothing was
    delivered, or a 4xx / 529 reply."""
    status = error.status
    return isinstance(error, NotSentError) or (status is not None and (400 <= status < 500 or status in NOT_RUN))


def _slows_down(error: Optional[BaseException]) -> bool:
    """A 429 / 529: it slows the job down and never uses up a row's attempts."""
    return isinstance(error, ApiError) and error_class(error.error_type, error.status) == SLOW_DOWN \
        and error.status is not None


def _errored(error: ApiError, tries: dict, note: str = "") -> dict:
    """A row that ends errored: every send answered with an error was not billed; one that got no reply
    may have run."""
    return {"result_type": "errored", "state": ERRORED, "error_type": error.error_type or "api_error",
            "error_message": str(error) + note, "cost_usd": None if tries.get("unreplied") else NOT_BILLED}
