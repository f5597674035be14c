"""Batch mode, after the creates: poll the job's batches until they end, then collect their results.

* poll     — retrieve in-flight batches until they end; a batch the API no longer knows (404) is lost:
             its rows end errored `batch_not_found` (they may have been paid for: sent again only with
             --resend-lost).
* collect  — stream the results line by line (downloaded and parsed in a thread, a few thousand lines
             ahead; the next batch's begun while one is recorded), match each to its row by custom_id,
             record them in transactions of 10000; a download
             cut short is downloaded again; a line that never arrives, however often the whole file is
             downloaded, ends its row `result_missing`; results gone end theirs `results_gone`. A batch is
             collected only when every member has its result.
* retry    — expired requests go back to pending, up to max_attempts; rows whose errored result is the
             service's error, not the request's (results.retry_rule), go back without using an attempt
             (ServiceErrors stops a run that keeps meeting them).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
from typing import Iterator, Optional

from . import failpoints
from .adoption import EMPTY, GONE, Adoption, row_ids
from .context import ADOPTED, MISSING_AFTER, PROVEN, BatchContext
from .errors import ACCOUNT, AuthError, GaveUpError, NotFoundError, ResultsGoneError, TransientApiError, error_class
from .prefetch import Prefetch
from .results import FREE, retry_rule
from .states import ANSWERED, COLLECTED, LOST, SUBMITTED
from .store import Batch, now_iso

log = logging.getLogger("batchrun")

MAX_DOWNLOADS = 6    # attempts to get a complete results file
FLUSH_EVERY = 10000  # results per transaction (a 10k-row batch in one: each of its pages written to the WAL once)


def _cycle_collection_paused():
    """Python's cyclic garbage collector paused (the function returned starts it again, if it ran): a
    collect makes and drops some ten containers per result line (its parsed JSON, its fields), none in a
    cycle, which reference counting frees; the collector's passes over the heap they set off took ~5% of
    the collect's CPU."""
    if not gc.isenabled():
        return lambda: None
    gc.disable()
    return gc.enable


class _Ahead:
    """A batch's retrieve and results download, begun in a thread (Collector._next's items)."""

    def __init__(self, batch: int, source: Iterator):
        self.batch = batch
        self._prefetch = Prefetch(source, depth=8, chunk=500)
        self.items = iter(self._prefetch)

    def close(self) -> None:
        """Not wanted after all: the thread stops (and closes the download)."""
        self._prefetch.close()


class ServiceErrors:
    """Batch mode: errored results whose error is the service's, not the request's (results.retry_rule).

    Their rows go back to pending without using an attempt. The run stops (exit 4, the rows pending,
    the next run sends them) at once when one is about the account (authentication, permission,
    billing: no retry can fix it), and after PATIENCE rounds in a row that met such errors and in which
    no row got an answer."""

    PATIENCE = 3

    def __init__(self) -> None:
        self.strikes = 0
        self._new_round()

    def _new_round(self) -> None:
        self.answered = 0
        self.met: dict = {}           # error class -> [rows, first error type, its message]

    def meet(self, fields: dict) -> None:
        kind = error_class(fields.get("error_type"))
        seen = self.met.setdefault(kind, [0, fields.get("error_type"), fields.get("error_message") or ""])
        seen[0] += 1

    def check(self, job: str) -> None:
        met, answered = self.met, self.answered
        self._new_round()
        if not met:
            return
        if ACCOUNT in met:
            n, error_type, message = met[ACCOUNT]
            raise AuthError(f"{n} rows came back errored with {error_type}: {message} (the account or key, not the "
                            "requests: they stay pending; fix it, then run again to send them)")
        self.strikes = 0 if answered else self.strikes + 1
        n, error_type, message = max(met.values(), key=lambda seen: seen[0])
        if self.strikes >= self.PATIENCE:
            raise GaveUpError(f"{n} rows came back errored with {error_type}: {message} — {self.strikes} rounds in "
                              "a row with no row answered; not an error of the requests: they stay pending and the "
                              "next run sends them again")
        log.warning("job %s: %d rows came back errored with %s (%s): the service's error, not the requests'; "
                    "sending them again (no attempt used)", job, n, error_type, message)


class Collector:
    """Polls a job's batches and records their results (see the module's docstring)."""

    def __init__(self, ctx: BatchContext, adoption: Adoption, service_errors: ServiceErrors):
        self.ctx = ctx
        self.store = ctx.store
        self.adoption = adoption
        self.service_errors = service_errors
        self._incomplete_downloads: dict = {}   # batch -> rounds in which its results never came whole
        self.recorded = 0                       # rows recorded (taken out of flight) by the download under way
        self._then: Optional[Batch] = None      # the batch polled after the one being collected
        self._ahead: Optional[_Ahead] = None    # its retrieve and download, begun (see _download)

    def poll(self, collect: bool = True) -> bool:
        """Retrieve in-flight batches; collect those that ended (unless `collect` is False: then only
        their status is brought up to date). True if anything changed.

        Batches are retrieved and collected one after the other, in the same order of requests as ever;
        once a batch's results have all come, the next batch's retrieve and results download begin in a
        thread while they are recorded (see `_download`)."""
        changed = False
        batches = self.store.batches_to_poll(self.ctx.job_id)
        restore = _cycle_collection_paused()
        try:
            for i, b in enumerate(batches):
                ahead, self._ahead = self._ahead, None
                if ahead is not None and ahead.batch != b.id:
                    ahead.close()
                    ahead = None
                if b.state == SUBMITTED:
                    try:
                        info = next(ahead.items) if ahead is not None else self.ctx.client().retrieve_batch(b.api_id)
                    except NotFoundError:
                        self.lost(b)
                        changed = True
                        continue
                    if not self.store.record_status(b.id, info):   # not ended yet
                        continue
                    if not collect:
                        changed = True
                        continue
                    b = self.store.batch(b.id)
                elif not collect:
                    continue
                elif ahead is not None:
                    next(ahead.items)   # (None: an ended batch is not retrieved)
                self._ahead = ahead      # its download, if it began one: taken by _download
                self._then = batches[i + 1] if i + 1 < len(batches) else None
                self.collect(b)
                changed = True
        finally:
            restore()
            self._then = None
            if self._ahead is not None:   # begun for a batch not polled after all (an error)
                self._ahead.close()
                self._ahead = None
        return changed

    def collect(self, b: Batch) -> None:
        """Download and record the results of ended batch `b`; close it once every member has its result."""
        store, short_id = self.store, self.ctx.short_id
        if not b.results_url:  # ended without a results_url yet: ask again next round
            info = self.ctx.client().retrieve_batch(b.api_id)
            if not info.get("results_url"):
                return
            store.set_results_url(b.id, info["results_url"])
            b = dataclasses.replace(b, results_url=info["results_url"])
        members = store.members(b.id)
        if b.adopted == ADOPTED and not self.verify_adopted(b):
            return
        # the API's count of the batch's results: a file with fewer lines was cut short
        expected = b.results_expected or members
        # whole downloads in a row that came back the same (as many lines) without the rows still missing:
        # a file cut short at random differs from one download to the next; a line that never arrives does not
        short, last = b.short_downloads, None
        for attempt in range(MAX_DOWNLOADS):
            lines = None
            self.recorded = 0   # rows this download took out of flight (see record)
            try:
                lines = self._download(b, expected)
            except TransientApiError as exc:
                log.warning("job %s: results of %s cut short (%s); downloading again", short_id, b.api_id, exc)
            except ResultsGoneError as exc:
                self.results_gone(b, str(exc))
                return
            missing = store.rows_in_flight(b.id)
            if missing == 0:
                break
            if lines is not None:   # the file came whole, and some of our rows have no line in it
                if self.recorded or (last is not None and lines != last):
                    short = 0
                elif last is not None:
                    short += 1
                last = lines
                store.set_short_downloads(b.id, short)
                if lines >= expected or short >= MISSING_AFTER:
                    self.results_missing(b, short)   # a line that never arrives: not waited for forever
                    return
            log.warning("job %s: results of %s lack %d of %d rows; downloading again", short_id,
                        b.api_id, missing, members)
            self.ctx.sleep(0.1 * (attempt + 1))
        else:
            # never whole: the rows without a result were still paid for, so they are not sent again;
            # the batch stays ended and is downloaded again next round (or by the next run)
            failures = self._incomplete_downloads[b.id] = self._incomplete_downloads.get(b.id, 0) + 1
            if failures >= 3:
                raise GaveUpError(
                    f"the results of batch {b.api_id} could not be downloaded whole ({failures * MAX_DOWNLOADS} "
                    f"tries; {missing} of {members} rows still lack theirs); the results recorded so far are kept")
            return
        store.finalize_batch(b.id)
        log.info("job %s: collected batch %s", short_id, b.api_id)

    def record(self, b: Batch, results) -> None:
        """Record (custom_id, fields) pairs of batch `b`, committing every FLUSH_EVERY (see
        CollectQueries.record_results for what each does to its row)."""
        store, job_id, max_attempts = self.store, self.ctx.job_id, self.ctx.spec.max_attempts
        final: list = []
        retry: list = []
        free: list = []
        now = now_iso()
        errors = self.service_errors

        def flush() -> None:
            self.recorded += store.record_results(job_id, b.id, max_attempts, final, retry, free, now=now)
            final.clear()
            retry.clear()
            free.clear()

        n = 0
        for custom_id, f in results:
            if custom_id is None:
                continue   # not one of this job's custom_ids
            rule = retry_rule(f)
            if rule is None:
                final.append((custom_id, f))
                if f["state"] in ANSWERED:
                    errors.answered += 1
            elif rule == FREE:        # the service's error, not the request's: sent again, no attempt used
                free.append((custom_id, f))
                errors.meet(f)
            else:
                retry.append((custom_id, f))
            failpoints.hit("result_line")
            n += 1
            if n == FLUSH_EVERY:
                flush()
                n = 0
        if n:
            flush()

    def _download(self, b: Batch, expected: int) -> int:
        """Download and record a batch's results; returns the number of result lines (a whole file).

        The file is downloaded and parsed in a thread, a few thousand lines ahead of the recording. Once
        `expected` lines have come (the whole file), the next batch of the poll (`_then`) is retrieved and,
        if it has ended, its results downloaded and parsed, in a thread of their own while these are
        recorded: the API (and the emulator) makes a results file before it sends any of it. The requests
        go out in the order they always did: this batch's downloads, then the next one's retrieve, then
        its download (but when this file, whole, still lacks some of its rows: then it is downloaded
        again after those)."""
        store, items = self.store, None
        if self._ahead is not None and self._ahead.batch == b.id:   # begun by the poll: the first download
            ahead, self._ahead = self._ahead, None
            if next(ahead.items, None) == b.results_url:
                items = ahead.items
            else:
                ahead.close()
        store.count_download(b.id)
        if items is None:
            items = iter(Prefetch(self._results(b.results_url, row_ids(store, b)), depth=8, chunk=500))
        then = self._then
        row_id_then = row_ids(store, then) if then is not None else None
        lines = 0

        def counted():
            nonlocal lines
            for item in items:
                lines += 1
                if lines == expected and then is not None and self._then is then:
                    self._then, self._ahead = None, _Ahead(then.id, self._next(then, row_id_then))
                yield item

        self.record(b, counted())
        return lines

    def _results(self, url: str, row_id) -> Iterator[tuple]:
        """(custom_id, fields) for each line of a results file (iterated in a thread)."""
        client, parse = self.ctx.client(), self.ctx.parser.parse
        for line in client.iter_results(url):
            yield row_id(line.get("custom_id")), parse(line.get("result") or {})

    def _next(self, b: Batch, row_id) -> Iterator:
        """The retrieve of batch `b` (None: it has ended already); then, if it has ended with its results
        at hand (and needs no proof that it is this job's), their URL and their (custom_id, fields)."""
        info = self.ctx.client().retrieve_batch(b.api_id) if b.state == SUBMITTED else None
        yield info
        url = b.results_url if info is None else info.get("processing_status") == "ended" and info.get("results_url")
        if url and b.adopted != ADOPTED:
            yield url
            yield from self._results(url, row_id)

    def verify_adopted(self, b: Batch) -> bool:
        """A batch adopted before adoption needed proof (by an older batchrun) is proved now, before any
        row takes an answer from it; one that is not the intent's goes back to being looked for."""
        verdict = self.adoption.proof(b, {"id": b.api_id, "results_url": b.results_url})
        if verdict == EMPTY:   # downloaded again next round; the same empty file again and again: lines missing
            again = self.store.empty_again(b.id)
            if again >= MISSING_AFTER:
                self.results_missing(b, again)
            return False
        if verdict == GONE:   # whoever's it was, its rows cannot be answered from it, nor sent again blindly
            self.results_gone(b, f"the results of batch {b.api_id}, adopted after a lost create reply, are gone "
                                 "before it could be proved this job's; its rows may have been paid for")
            return False
        if verdict is False:
            self.store.unadopt(b, f"adopted {b.api_id} by mistake: its custom_ids are not this batch's")
            log.warning("job %s: batch %s was not ours after all; looking for ours again", self.ctx.short_id,
                        b.api_id)
        elif verdict:
            self.store.mark_proven(b.id, PROVEN)
        return bool(verdict)   # None: its results could not be read now; proved next round

    def lost(self, b: Batch) -> None:
        """The API no longer knows this batch (deleted, or the key is another workspace's). It may have
        run and been paid for, so its rows are not sent again unless asked (--resend-lost): they end
        errored, as rows whose results are gone do."""
        message = (f"batch {b.api_id} is not found at the API (404): deleted, or the API key belongs to another "
                   "workspace. Not sent again, since it may have run and been paid for; `run --resend-lost` "
                   "sends its rows again")
        n = self.store.end_rows_gone(b.id, "batch_not_found", message, LOST, "the API answered 404 for this batch")
        self.store.event(self.ctx.job_id, "warning", f"batch {b.api_id} not found at the API; {n} rows errored")
        log.error("job %s: %s (%d rows)", self.ctx.short_id, message, n)

    def results_gone(self, b: Batch, message: str) -> None:
        self.store.end_rows_gone(b.id, "results_gone", f"{message}; `run --resend-lost` sends its rows again",
                                 COLLECTED, "results gone")
        log.error("job %s: %s", self.ctx.short_id, message)

    def results_missing(self, b: Batch, again: int) -> None:
        """Rows of an ended batch whose result line never arrives, however often its whole results file is
        downloaded: they end errored `result_missing` (the batch ran, so they may have been paid for: sent
        again only with --resend-lost), and the batch is collected."""
        message = (f"no result came back for this request: the results file of batch {b.api_id} lacked it, "
                   f"downloaded whole {again + 1} times over; it may have been paid for, so it is not sent again: "
                   "`run --resend-lost` sends it again")
        n = self.store.end_rows_gone(b.id, "result_missing", message, COLLECTED, "result lines missing")
        self.store.event(self.ctx.job_id, "warning", f"batch {b.api_id}: {n} result lines never arrived")
        log.error("job %s: %d rows of batch %s never got a result line (the file downloaded whole %d times); they "
                  "end errored result_missing (`run --resend-lost` sends them again)", self.ctx.short_id, n,
                  b.api_id, again + 1)
