"""Batch mode's one ambiguous moment: a create whose reply never came (or that a killed run left under way).

The batch it may have made is looked for in the API's list, and adopted only once its results prove it
this job's (every custom_id one the intent sent, with the job's tag); when no such batch can appear any
more, the intent is abandoned and its rows are sent again; when a candidate can no longer be told (its
results gone, or never a line in them), its rows end errored and are sent again only with --resend-lost.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from typing import Optional

from .context import MISSING_AFTER, PROVEN, BatchContext
from .errors import (ApiError, GaveUpError, InputError, NoBatchApiError, NotFoundError, ResultsGoneError,
                     TransientApiError)
from .requests import wire_id
from .states import ABANDONED
from .store import Batch, now_iso, parse_iso

log = logging.getLogger("batchrun")

ADOPT_WINDOW = 600.0      # seconds of clock skew tolerated when the API's clock is unknown
CLOCK_TOLERANCE = 3.0     # the Date header's 1 s resolution, plus latency
AMBIGUOUS_GRACE = 60.0    # a create that failed ambiguously, or was cut off by a crash: how long its batch may
                          # take to show in the list before its rows are sent again (BATCHRUN_CREATE_GRACE)
GONE = "gone"             # proof: a candidate whose results can no longer be read
EMPTY = "empty"           # proof: its results file came whole without a line


def create_grace() -> float:
    """AMBIGUOUS_GRACE, or the seconds BATCHRUN_CREATE_GRACE sets (a slow gateway; a quick test)."""
    value = os.environ.get("BATCHRUN_CREATE_GRACE")
    try:
        return max(0.0, float(value)) if value else AMBIGUOUS_GRACE
    except ValueError:
        raise InputError(f"BATCHRUN_CREATE_GRACE: not a number of seconds: {value!r}") from None


class Adoption:
    """Resolves a job's intents: the batch a lost create made is adopted once proved the job's."""

    def __init__(self, ctx: BatchContext):
        self.ctx = ctx
        self.store = ctx.store
        self._waiting: dict = {}   # intent -> running batches it waits for (logged once)
        create_grace()             # a bad BATCHRUN_CREATE_GRACE is refused before anything is sent

    def submitted(self, local: int, info: dict, *, adopted: int) -> None:
        """The intent's batch is named (created, or adopted): recorded durably, and counted as this run's."""
        self.store.mark_submitted(local, info, adopted)
        self.ctx.counters.batches_created += 1

    def resolve_intents(self) -> None:
        for local in self.store.intents(self.ctx.job_id):
            self.resolve_intent(local)

    def resolve_intent(self, local: int) -> bool:
        """Find the batch an unanswered create may have made; adopt it once proved ours, or else (when no
        such batch can appear any more) abandon the intent so that its rows are sent again.

        A create is ambiguous when it failed without proof that no batch was made (ambiguous_at is
        when), and when the run that made it died while it was under way: an intent left by a dead run
        (this run holds the job's lock) is stamped ambiguous when found, since its create may still be
        landing. The batch, if it exists, was created after the intent and, at the latest, the grace
        (create_grace()) after the create ended — at the latest when it failed or was found cut off,
        or when the longest create call would have ended. Candidates: batches of the intent's request
        count created in that window by the API's clock, not known to this state file. Each is proved
        or disproved by its results (proof): every custom_id must be one the intent sent, which carry
        this job's own tag. A candidate still running cannot be proved yet: the intent waits for it to
        end (its rows stay in flight; nothing is sent blindly). Returns whether a batch was adopted.
        """
        store, short_id = self.store, self.ctx.short_id
        b = store.batch(local)
        if not b.ambiguous_at:
            b.ambiguous_at = now_iso()
            store.mark_ambiguous(local, b.ambiguous_at)
            log.warning("job %s: a run died while creating a batch of %d requests; looking for it before sending "
                        "them again", short_id, b.request_count)
        known = store.known_batches(local)
        client = self.ctx.client()
        intent = parse_iso(b.intent_at).timestamp()
        longest = intent + client.retry.max_elapsed + (client.http.timeout.read or 600.0)
        sent_by = min(parse_iso(b.ambiguous_at).timestamp(), longest) + create_grace()
        candidates = []
        pages = client.list_batches()
        try:
            first = next(pages, None)
        except NoBatchApiError as exc:
            if client.has_batch_create():
                raise ApiError(f"{client.shown_url} creates batches but does not list them ({exc.status}): "
                               "whether the create a run lost made a batch cannot be checked, so its rows are not "
                               "sent again; ask the gateway's operator, or run with `--mode messages`",
                               status=exc.status) from None
            # no batch endpoint at all: the create can have made nothing. The intent is dropped (the job
            # is as if never sent, and may continue in messages mode)
            store.drop_intent(local)
            raise
        for item in itertools.chain([first] if first is not None else [], pages):   # newest first; its first
            # page tells the API's clock
            offset = client.server_offset
            if offset is None:
                since, until = intent - ADOPT_WINDOW, sent_by + ADOPT_WINDOW
            else:
                since, until = intent + offset - CLOCK_TOLERANCE, sent_by + offset + CLOCK_TOLERANCE
            created = parse_iso(item["created_at"]).timestamp()
            if created < since:
                break
            if created > until or item["id"] in known:
                continue
            if sum((item.get("request_counts") or {}).values()) == b.request_count:
                candidates.append(item)
        running, gone, untagged, empty = [], [], [], []
        for item in reversed(candidates):   # the earliest first: the one sent first
            verdict = self.proof(b, item) if item.get("processing_status") == "ended" else None
            if verdict == GONE:   # ours or not, it cannot be told any more
                gone.append(item["id"])
                continue
            if verdict == EMPTY:   # nothing in it to tell whose it is (yet: downloaded again, as collect does)
                empty.append(item["id"])
                continue
            if verdict and b.tag is None:   # sent untagged (an older batchrun): its ids prove nothing
                untagged.append(item["id"])
                continue
            if verdict:
                self.submitted(local, item, adopted=PROVEN)
                store.event(self.ctx.job_id, "warning", f"adopted batch {item['id']} whose create reply was lost "
                                                        "(its results carry this job's custom_ids)")
                log.warning("job %s: adopted batch %s (its create reply was lost; its results carry this job's "
                            "custom_ids); nothing sent twice", short_id, item["id"])
                return True
            if verdict is False:
                store.note_foreign(item["id"], local)
                log.info("job %s: batch %s, of the same size, is not the one whose create reply was lost (its "
                         "custom_ids are not the ones sent)", short_id, item["id"])
            else:
                running.append(item["id"])
        if empty:
            again = store.empty_again(local)
            if again < MISSING_AFTER:
                running += empty   # waited for as a batch whose results cannot be read yet
            else:
                gone += empty      # the same empty file, again and again: it never proves anything
        if running:
            store.wait_note(local, f"create reply was lost: waiting for batch {', '.join(running)} (running, of "
                                   "the same size) to end, when its results tell whether it is this job's")
            if running != self._waiting.get(local):
                self._waiting[local] = running
                log.warning("job %s: batch %s may be the one whose create reply was lost; its rows wait for it to "
                            "end, when its results tell whose it is", short_id, ", ".join(running))
            return False
        if time.time() < sent_by:
            store.wait_note(local, "create reply was lost: looking for its batch in the API's list until "
                                   f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(sent_by))}")
            return False   # it may still show: looked for again next round, its rows kept in flight
        if gone:   # it may be ours, and paid for: not sent again blindly
            return self._unprovable(local, "results_gone", (
                f"the create reply of this request's batch was lost, and batch {', '.join(gone)}, of the same "
                "size and created then, may be that batch, but its results are gone (deleted, or past the 29 "
                "days results are kept) or hold no line, so it cannot be proved this job's or not. Not sent "
                "again, since it "
                "may have been paid for; `run --resend-lost` sends it again"),
                f"create reply lost; candidate {', '.join(gone)} has no results any more")
        if untagged:   # the same ids as ours, but an older batchrun sent them without the job's tag
            return self._unprovable(local, "batch_unproven", (
                f"the create reply of this request's batch was lost (sent by an older batchrun, without the "
                f"job's tag in its custom_ids), and batch {', '.join(untagged)}, of the same size and ids, "
                "may be that batch or another job's with the same ids: it cannot be proved this job's, so "
                "its answers are not taken. Not sent again, since it may have been paid for; `run "
                "--resend-lost` sends it again"),
                f"create reply lost; untagged candidate {', '.join(untagged)} cannot be proved")
        store.abandon(local, "create reply lost and no batch of this job's appeared: requests are pending again")
        log.info("job %s: the lost create made no batch; its requests will be sent again", short_id)
        return False

    def _unprovable(self, local: int, error_type: str, message: str, note: str) -> bool:
        """The intent's candidate can be proved neither ours nor another's: its rows end errored `error_type`
        (sent again only with --resend-lost, since they may have been paid for) and the intent is abandoned."""
        n = self.store.end_rows_gone(local, error_type, message, ABANDONED, note)
        log.error("job %s: %d rows: %s", self.ctx.short_id, n, message)
        return False

    def proof(self, b: Batch, item: dict):
        """Whether an ended batch is the one intent `b` sent: True when every custom_id in its results is
        one the intent sent (with this job's tag), False at the first that is not; None when its results
        could not be read now (asked again next round); GONE when they never can be, EMPTY when the file came
        whole without a line (neither proves anything)."""
        client = self.ctx.client()
        url = item.get("results_url")
        sent = self.sent_ids(b)
        seen = 0
        try:
            if not url:
                url = client.retrieve_batch(item["id"]).get("results_url")
                if not url:
                    return None
            with contextlib.closing(client.iter_results(url)) as lines:
                for line in lines:
                    if line.get("custom_id") not in sent:
                        return False
                    seen += 1
        except (ResultsGoneError, NotFoundError):
            return GONE
        except (TransientApiError, GaveUpError):
            return None
        return True if seen else EMPTY

    def sent_ids(self, b: Batch) -> set:
        """The custom_ids batch (or intent) `b` sent, as sent: with the tag it carried."""
        return {wire_id(b.tag, cid) for cid in self.store.member_ids(b.id)}


def row_ids(store, b: Batch):
    """From a custom_id in batch `b`'s results to the row's own custom_id (None: not one of this job's)."""
    tag: Optional[str] = b.tag
    if tag is None:
        return lambda wire: wire
    n = len(tag)
    hashed = {wire_id(tag, cid): cid for cid in store.member_ids(b.id, longer_than=64 - n - 1)}

    def row_id(wire):
        if not isinstance(wire, str) or not wire.startswith(tag):
            return None
        if wire[n:n + 1] == "-":
            return wire[n + 1:]
        return hashed.get(wire)
    return row_id
