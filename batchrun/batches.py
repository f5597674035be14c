"""Batch mode's sending: pending rows go out in Message Batches, each committed as an intent first.

For each chunk of pending requests (in input order, at most batch_size, within the API's 256 MB and the
budget), the rows are chosen and their intent committed (durably) in one write-locked transaction that
also leaves out rows another job of the state file has answered or is sending (the paid-once rule, see
store.batches.taken_elsewhere); then the batch is POSTed and its id committed. A create whose reply is
lost is resolved by adoption.py, never by sending again blindly. A job whose prompt prefix is cached
sends one row alone first (a primer) and the rest once it has ended. Cancel lives here too: the batches
in flight are canceled, the rows not yet sent end canceled, and what ended is collected.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Callable, Optional

from . import failpoints
from .adoption import Adoption
from .collector import Collector
from .context import BatchContext
from .errors import (AmbiguousCreateError, ApiError, AuthError, GaveUpError, InputError, LockedError, NoBatchApiError,
                     RequestTooLargeError, TransientApiError)
from .prefetch import Ahead
from .requests import new_job_tag, wire_id
from .spec import PRIME_MIN_ROWS, primes_cache
from .states import PENDING
from .store import JobLock, now_iso, parse_iso

log = logging.getLogger("batchrun")

MAX_BATCH_BYTES = 256 * 1000 * 1000 - 64 * 1024   # the API's 256 MB, with room for the envelope
PRIME_LAPSE = 0.75       # a cache last touched this share of its TTL ago may lapse before a batch sent now
                         # runs: it is primed again
PRIME_TRIES = 2          # primers in a row that brought no answer before priming stops
CACHE_TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}


class Chunk:
    """The rows chosen for a batch, made into what is sent: `rows` (row_index, custom_id, row body, the size
    of its request line in bytes + 1) each; `ids` and `payload` (the create's body, bytes) of the first rows
    that fit in one batch (MAX_BATCH_BYTES), in order. Made where the rows are rendered (in a thread while the
    previous batch uploads, see BatchDriver._render_ahead), so the sender only posts it. The request lines
    are not kept beside the payload: a shorter payload is cut from it (`payload_of`)."""

    HEAD, TAIL = b'{"requests":[', b"]}"

    def __init__(self, rows: list):
        """`rows`: (row_index, custom_id, row body, request line) each."""
        size, lines, full = 16, [], False   # (the envelope, as counted before)
        self.rows = []
        for index, cid, body, line in rows:
            n = len(line.encode("utf-8")) + 1   # (and its comma)
            self.rows.append((index, cid, body, n))
            if not full and (not lines or size + n <= MAX_BATCH_BYTES):
                lines.append(line)
                size += n
            else:
                full = True   # the batch ends before the first row that does not fit: the rows after it wait
        fit = len(lines)
        self.ids = [row[1] for row in self.rows[:fit]]
        self.payload = self.HEAD + ",".join(lines).encode("utf-8") + self.TAIL

    def payload_of(self, n: int) -> bytes:
        """The create's body carrying the first `n` rows (n at most len(ids), at least 1)."""
        end = len(self.HEAD) + sum(row[3] for row in self.rows[:n]) - 1
        return self.payload[:end] + self.TAIL


class BatchDriver:
    """Sends a job's pending rows in batches (see the module's docstring).

    `move_twin(job_id)` polls and collects another job's batches, as its own run would (under its lock,
    which the driver takes); it raises InputError when that job's stored spec no longer loads here."""

    def __init__(self, ctx: BatchContext, adoption: Adoption, collector: Collector,
                 move_twin: Callable[[str], None]):
        self.ctx = ctx
        self.store = ctx.store
        self.adoption = adoption
        self.collector = collector
        self.move_twin = move_twin
        self._chunk = ctx.spec.batch_size
        self._job_tag: Optional[str] = None   # the job's tag, once read or made (see tag)
        self._ahead: Optional[tuple] = None     # (the rows, Ahead making them): the next chunk (see _render_ahead)

    # ---- submit --------------------------------------------------------------------------------
    def submit(self) -> int:
        """Send pending requests in batches. Returns the number of batches created."""
        store, ctx, spec = self.store, self.ctx, self.ctx.spec
        job_id = ctx.job_id
        if store.canceled_at(job_id):
            self.cancel_pending()  # rows a canceled batch gave back for another attempt are not sent
            return 0
        prime = self.priming()
        if prime == "wait":
            return 0
        tag = self.tag()
        # not sent: rows another job has answered (reuse_answers takes them next round), and rows in
        # flight in another job, whose answers are coming (unless that job cannot be moved from here)
        silent = self.silent_twins()
        if spec.max_cost is not None:   # the figures a reservation needs (count_tokens calls, once) are had
            # (before the write lock is taken, not while holding it)
            for _, _, first in ctx.bodies(store.planned_rows(job_id, state=PENDING, limit=1)):
                ctx.ledger.estimator.request_max(first)
        try:
            return self._send_chunks(prime, tag, silent)
        finally:
            if self._ahead is not None:   # (a run ended early: the thread is done before the source closes)
                self._ahead[1].wait()
                self._ahead = None

    def _send_chunks(self, prime: Optional[str], tag: str, silent: list) -> int:
        store, ctx, spec = self.store, self.ctx, self.ctx.spec
        job_id, short_id = ctx.job_id, ctx.short_id
        created = 0
        after = -1   # rows are taken in input order; each chunk starts where the last one ended
        while True:
            if prime and after >= 0:
                return created   # a primer goes alone; the rest once it has ended
            # what to send is chosen and its intent committed in one (write-locked) transaction: another
            # job of this state file sharing these requests (even one planned a moment ago) sees them in
            # flight, or has them in flight already and they are not chosen here; never both sent
            with store.transaction(durable=True):
                # (and rows a messages-mode job being run now has claimed: it is sending them)
                alone = store.alone(job_id)
                chosen = store.pending_chunk(job_id, after, 1 if prime else self._chunk, None if alone else silent)
                if not chosen:
                    return created
                # their bodies rendered again from the input and checked against their hashes (or stored):
                # an input changed since the plan ends the run here, its intent not recorded, nothing sent
                chunk = self._made_ahead(chosen) or self._pieces(chosen, tag)()
                rows, ids, payload = chunk.rows, chunk.ids, chunk.payload
                reserve = None
                if spec.max_cost is not None:   # a batch reserves its maximum cost; cut to the rows that fit
                    fit, reserve = ctx.ledger.reserve([row[2] for row in rows[:len(ids)]], short_id)
                    if not fit:
                        return created
                    if fit < len(ids):
                        ids, payload = ids[:fit], chunk.payload_of(fit)
                sent_through = rows[len(ids) - 1][0]
                # without twin filtering, the chunk is every pending row in its row range
                span = (rows[0][0], sent_through) if alone else None
                local = store.record_intent(job_id, ids, len(payload), float(reserve) if reserve is not None else None,
                                            span, tag)
                if prime:
                    self._primer(local, ids[0])
            failpoints.hit("after_intent")
            if not prime:   # the next chunk is rendered while this one uploads
                self._render_ahead(job_id, sent_through, None if alone else silent, tag)
            try:
                info = ctx.client().create_batch(payload)
                failpoints.hit("after_create")
            except AmbiguousCreateError as exc:
                # the batch may exist, or appear in the list a little later (a gateway that timed out
                # while the API went on): its rows stay in flight until it is found or the grace is over
                log.warning("job %s: %s; looking for it before sending again", short_id, exc)
                store.mark_ambiguous(local, now_iso())
                if self.adoption.resolve_intent(local):
                    created += 1
                after = sent_through
                continue
            except RequestTooLargeError as exc:
                if len(ids) == 1:   # alone and still too large for this endpoint: it can never be sent
                    store.mark_too_large(local, job_id, ids[0], "the API refused this request as too large even "
                                                                f"alone ({exc.message})")
                    log.error("job %s: request %s is too large for the API even alone; it ends errored", short_id,
                              ids[0])
                    self._chunk = spec.batch_size   # one outsized row does not make every later batch small
                    after = sent_through
                    continue
                store.abandon(local, "413 request_too_large: splitting the batch")
                self._chunk = max(1, len(ids) // 2)
                continue
            except (TransientApiError, GaveUpError) as exc:
                # the client retried for a bounded time and the API still did not take the batch (a
                # full batch queue, an outage): wait while our batches in flight can still end, else stop
                store.abandon(local, f"not created: {exc}")
                if not store.batches_running(job_id):
                    raise
                log.warning("job %s: batch not created (%s); trying again after the batches in flight",
                            short_id, exc)
                return created
            except NoBatchApiError:
                # certainly not created: the intent is dropped, its rows are as if never sent (the job is
                # not started if nothing else was), and the same job runs on in messages mode
                store.drop_intent(local)
                raise
            except ApiError:
                store.abandon(local, "refused by the API")
                raise
            self.adoption.submitted(local, info, adopted=0)
            ctx.counters.requests_sent += len(ids)
            created += 1
            after = sent_through
            log.info("job %s: submitted batch %s (%d requests)", short_id, info.get("id"), len(ids))

    # ---- the next chunk, made while a batch uploads ---------------------------------------------------
    # Rendering a chunk again (bodies.py) is the submit's CPU work; a create is mostly waiting on the
    # network, without the GIL. So once an intent is committed, the rows most likely to be chosen next
    # (the next pending rows as they stand) are rendered, checked and made into request lines in a thread
    # while the batch uploads. Nothing is decided there: the next chunk is still chosen, and its intent
    # recorded, in its own write-locked transaction, and it uses what was made ahead only if it chose
    # exactly those rows (else it renders its own); a render that failed (the input changed) raises only
    # there, before that chunk's intent, so nothing of it is sent.
    def _pieces(self, chosen: list, tag: str) -> Callable[[], "Chunk"]:
        """What makes the chunk (see Chunk) of the rows `chosen`."""
        bodies, full_body = self.ctx.bodies(chosen), self.ctx.full_body   # (asked here: its source made here)

        def make() -> Chunk:
            rows = []
            for index, cid, body in bodies:
                rows.append((index, cid, body, '{"custom_id":' + json.dumps(wire_id(tag, cid)) + ',"params":'
                             + full_body(body) + "}"))
            return Chunk(rows)
        return make

    def _render_ahead(self, job_id: str, after: int, silent: Optional[list], tag: str) -> None:
        nxt = self.store.pending_chunk(job_id, after, self._chunk, silent)
        if nxt:
            self._ahead = (nxt, Ahead(self._pieces(nxt, tag)))

    def _made_ahead(self, chosen: list) -> Optional[Chunk]:
        """The rows made ahead, if they are the ones `chosen` (their exceptions raised here); else None."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        if ahead[0] != chosen:
            ahead[1].wait()   # not these rows: dropped (the body source is free again once it has finished)
            return None
        return ahead[1].result()

    def tag(self) -> str:
        """This job's tag (see requests.new_job_tag): made once, at its first submit, and kept."""
        if self._job_tag is None:
            self._job_tag = self.store.job_tag(self.ctx.job_id, new_job_tag())
        return self._job_tag

    # ---- priming the prompt cache ------------------------------------------------------------------
    # The items of one batch run concurrently and do not read each other's cache writes: a batch sent
    # cold writes the cached prefix once per row. So a job whose prefix is cached (primes_cache) first
    # sends one request — its first pending row's own, so nothing is wasted — alone, as a batch like
    # any other (intent, create, adoption of a lost reply), waits for it to end, then sends the rest,
    # which read what it wrote. Rows sent later (retries, the rest of a full queue or a budget, a cron
    # run hours on), when the cache may have lapsed, are primed again: the cache counts as warm for
    # PRIME_LAPSE of its TTL after the intent of the latest batch whose replies wrote or read it.
    def priming(self) -> Optional[str]:
        """None: send the pending rows now; "wait": a primer is in flight; "prime": send one row alone first."""
        store, spec, job_id = self.store, self.ctx.spec, self.ctx.job_id
        if not primes_cache(spec, self.ctx.job.model):
            return None
        if store.primer_requests(job_id):
            return "wait"
        if store.counts(job_id).get(PENDING, 0) < PRIME_MIN_ROWS:
            return None
        history = store.cache_history(job_id)
        touched = history["touched_at"]
        if touched and time.time() < parse_iso(touched).timestamp() + PRIME_LAPSE * CACHE_TTL_SECONDS[
                spec.cache_ttl]:
            return None   # warm
        recent = history["recent"]   # (primer, collected, answered, touched), newest first
        if recent and recent[0][0] and recent[0][2]:
            return None   # a primer has just answered: the rest goes now, as warm as the cache can be
        answered = next((r for r in recent if r[0] and r[2]), None)
        if answered is not None and not answered[3]:
            return None   # a primer answered without writing the cache: the API does not cache this prefix
        failed = 0
        for primer, collected, ok, _ in recent:
            if not (primer and collected and not ok):
                break
            failed += 1
        return None if failed >= PRIME_TRIES else "prime"

    def _primer(self, local: int, custom_id: str) -> None:
        self.store.mark_primer(local)
        self.store.event(self.ctx.job_id, "info", f"priming the cache: 1 request ({custom_id}) before the rest")
        log.info("job %s: priming the cache: 1 request (%s) first, the rest once it has ended",
                 self.ctx.short_id, custom_id)

    # ---- other jobs sending the same requests --------------------------------------------------------
    def silent_twins(self) -> list:
        """Other jobs of this state file that have our pending requests in flight but whose answers are
        not coming: their batches cannot be moved from here (their stored job no longer loads).

        Rows in flight in any other job wait for that job's answers (reused when they land) instead of
        being paid twice. A job that a run is moving now answers them; a job nobody runs at the moment (a
        --no-wait run that exited, say) has its batches moved forward here, polled and collected under its
        lock as its own run would. Only a job whose batches cannot be moved from here leaves our rows to
        be sent. (A job that puts our requests in flight after this look is a run moving it now.)
        """
        if self.store.alone(self.ctx.job_id):
            return []
        return [j for j in self.store.twins_in_flight(self.ctx.job_id) if not self._advance_twin(j)]

    def _advance_twin(self, job_id: str) -> bool:
        """Poll and collect another job's batches (see silent_twins); False if that cannot be done."""
        lock = JobLock(self.ctx.spec.state_path, job_id)
        try:
            lock.acquire(probe=True)
        except LockedError:
            return True   # a run is moving it: its answers are coming
        try:
            self.move_twin(job_id)
            return True
        except InputError as exc:   # its stored job no longer loads here (a models file gone, say)
            log.warning("job %s: cannot move job %s forward (%s): the rows it shares with this job are sent here",
                        self.ctx.short_id, job_id[:12], exc)
            return False
        finally:
            lock.release()

    # ---- cancel --------------------------------------------------------------------------------
    def cancel(self, wait: float) -> tuple[int, int]:
        """Cancel the job (under its lock): its batches in flight are canceled, its rows not yet sent end
        canceled; then, for up to `wait` seconds, its batches are polled and collected until they end (see
        Runner.cancel). Returns (batches a cancel was sent for, batches still running)."""
        store, job_id, short_id = self.store, self.ctx.job_id, self.ctx.short_id
        self.adoption.resolve_intents()
        store.mark_canceled(job_id)
        self.cancel_pending()
        n = 0
        for b in store.batches_to_cancel(job_id):
            try:
                info = self.ctx.client().cancel_batch(b.api_id)
            except (AuthError, TransientApiError, GaveUpError):
                raise
            except ApiError as exc:  # ended meanwhile, or gone (404): the poll below finds out which
                log.warning("job %s: could not cancel batch %s: %s", short_id, b.api_id, exc)
                continue
            store.set_api_status(b.id, info.get("processing_status"))
            n += 1
        running = self.settle(wait)
        self.cancel_pending()
        return n, running

    def settle(self, wait: float) -> int:
        """Poll and collect the job's batches until none is running, for up to `wait` seconds (with
        backoff, capped at poll_interval). Returns how many are still running."""
        deadline = time.monotonic() + wait
        delay = min(0.5, self.ctx.spec.poll_interval)
        left = self.store.batches_running(self.ctx.job_id)
        while left and wait > 0:
            self.collector.poll()
            left = self.store.batches_running(self.ctx.job_id)
            if not left or time.monotonic() >= deadline:
                break
            self.ctx.sleep(min(delay, deadline - time.monotonic()))
            delay = min(delay * 2, self.ctx.spec.poll_interval)
        return left

    def cancel_pending(self) -> int:
        """Rows of a canceled job that are waiting to be sent (or sent again) end canceled."""
        return self.store.cancel_pending(self.ctx.job_id)
