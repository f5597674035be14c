"""Planning a job, and what a run does around sending: answers reused, the run's options, the output.

* plan    — read the input once, render and check every row, and store each request (custom_id, row
            body, hash) with the job's row in ONE transaction: all or nothing, nothing sent before the
            whole input has been validated. A job planned already is loaded (its column types pinned,
            its builder and shared prefix made again); the same job planned in the other mode and never
            sent is taken over (`take_over_other_mode`).
* reuse   — pending rows whose exact request another job of the state file had answered take that answer.
* options — --resume-canceled, --resend-lost, --retry-errored (the last within the budget, all or none).
* write   — stream the input again, join each block to its replies, and write the output atomically,
            once the input is proved the one that was planned.

The Planner is handed the job's spec, its identity (job.Job), the store, the result parser (given the
output schema the builder makes), the budget ledger and where to put a note for the run's result. Its
SQL is the store's (store/plan.py).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import sqlite3
from decimal import Decimal
from typing import Callable, Iterable, Iterator, Optional

from . import failpoints
from .bodies import BodySource, FirstBodies, input_for, input_stamp, row_figures
from .budget import BudgetLedger
from .errors import BudgetError, InputError, LockedError
from .inputs import ColumnTypeConflict, InputSource
from .job import Job, warnings_for
from .output import OutputWriter, check_column_names, check_partition
from .prefetch import Behind, prefetched
from .requests import (RequestBuilder, RowCheck, canonical_json, custom_id_for, custom_ids, full_body,
                       params_hasher, shared_params_hash, splice_prefix)
from .results import ResultParser
from .spec import JobSpec, default_cache_ttl, rules_version
from .states import PENDING
from .store import JobFigures, JobLock, Store
from .summary import budget_text

log = logging.getLogger("batchrun")


class Planner:
    def __init__(self, spec: JobSpec, job: Job, store: Store, parser: ResultParser, ledger: BudgetLedger,
                 note: Callable[[str], None]):
        self.spec = spec
        self.job = job
        self.store = store
        self.parser = parser
        self.ledger = ledger
        self.note = note                                 # a note for the run's result (said once)
        self.builder: Optional[RequestBuilder] = None    # once planned (or loaded): renders the job's rows
        self.prefix: Optional[str] = None                # the params every request shares (requests.splice_prefix)
        self.body_source: Optional[BodySource] = None    # the bodies of the planned rows (made on first use)
        self._first: Optional[FirstBodies] = None        # the first rows' bodies, when this run planned them

    def full_body(self, row_body: str) -> str:
        """The full params JSON of a planned request (its row body with the shared prefix spliced in)."""
        return full_body(self.prefix, row_body)

    # ---- the bodies of planned rows --------------------------------------------------------------
    def bodies(self, rows: Iterable[tuple]) -> Iterator[tuple[int, str, str]]:
        """(row_index, custom_id, row body) of planned rows (the store's `planned_rows`, in row order), as
        iterated: stored, or rendered again from the input and checked against their hashes (bodies.py)."""
        if self.body_source is None:
            self.body_source = BodySource.of_stored_job(self.store.job(self.job.id), self.spec, self._first)
            self._first = None
        return self.body_source.bodies(rows)

    def figures(self) -> JobFigures:
        """What an estimate of the job needs: its rows by state, its first body, and its pending bodies (as
        iterated: one pass over the input when they are rendered)."""
        store, job_id = self.store, self.job.id
        first = next(self.bodies(store.planned_rows(job_id, limit=1)), None)
        return JobFigures(counts=store.counts(job_id), first=first[2] if first else None,
                          pending=(body for _, _, body in self.bodies(store.planned_rows(job_id, state=PENDING))),
                          sizes=store.pending_sizes(job_id),
                          bodies_of=lambda rows: {i: body for i, _, body in
                                                  self.bodies(store.planned_rows_at(job_id, rows))})

    def sample(self, n: int) -> list[str]:
        """The bodies of the job's first `n` rows."""
        return [body for _, _, body in self.bodies(self.store.planned_rows(self.job.id, limit=n))]

    def close(self) -> None:
        if self.body_source is not None:
            self.body_source.close()

    # ---- plan ----------------------------------------------------------------------------------
    def plan(self) -> None:
        """Read, validate and render the whole input, and store its requests: all or nothing."""
        store, job, spec = self.store, self.job, self.spec
        existing = store.job(job.id) or self.take_over_other_mode()
        if existing and existing["planned_at"]:
            self._load(existing)
            return
        with store.checkpoint_behind():   # (the plan's commit returns without copying it into the file)
            while True:
                try:
                    with store.transaction():
                        store.record_job(job.id, spec, job.fingerprint, job.endpoint or "")
                        n = self._plan_rows()
                        failpoints.hit("plan")
                        # (taken before the fingerprint is: an input written after that shows in its stamp)
                        self._first.stamp = input_stamp(job.source)
                        if job.source.fingerprint() != job.fingerprint:   # the rows read are not the job's input
                            raise InputError(f"{spec.input} changed while it was being read: nothing planned, "
                                             "nothing sent; run the same command again once it is written")
                        store.mark_planned(job.id, n, job.source.pins(), canonical_json(self.builder.shared))
                    break
                except ColumnTypeConflict:   # the source pinned what did not hold: plan again from the start
                    pass
        for warning in warnings_for(spec, job.model, self.builder):
            log.warning("%s", warning)
        self.reuse_answers()
        log.info("job %s: %d rows planned (%s, model %s)", job.short_id, n, spec.input, spec.model)

    def take_over_other_mode(self) -> Optional[dict]:
        """The same job planned in the other mode and never sent (a gateway without batches refused the
        batch mode, say) is this job: it continues in this mode, with its rows, rather than a new job."""
        if self.job.fingerprint is None:
            return None
        other = "batch" if self.spec.mode == "messages" else "messages"
        other_spec = dataclasses.replace(self.spec, mode=other)
        if self.spec.cache_ttl_defaulted:   # that mode's own default
            other_spec.cache_ttl = default_cache_ttl(other, self.spec.cache_system)
        other_id = self.job.id_for(other_spec)
        if self.store.job(other_id) is None:   # (no lock file made for a job that is not there)
            return None
        lock = JobLock(self.spec.state_path, other_id)
        try:
            lock.acquire(probe=True)
        except LockedError:
            return None   # a run is moving it: not ours to take
        try:
            if not self.store.rekey_job(other_id, self.job.id, self.spec.mode):
                return None
        finally:
            lock.release()
        log.info("job %s: continues the same job planned in %s mode (nothing of it was sent)", self.job.short_id,
                 other)
        return self.store.job(self.job.id)

    def _load(self, row: dict) -> None:
        """A job planned already: its input's column types pinned as planned, its builder and prefix again."""
        self.job.source.pin(json.loads(row["column_types"] or "{}"))
        self._builder_for(self.job.source.schema)
        self.prefix = splice_prefix(json.loads(row["shared_params"])) if row["shared_params"] else None

    def _builder_for(self, input_schema) -> RequestBuilder:
        columns = input_schema.names
        builder = RequestBuilder(self.spec, self.job.model, columns, input_name=self.spec.input)
        check_partition(input_schema, builder.schema, self.spec.partition_by, self.spec.input)
        for note in check_column_names(columns, builder.schema):
            self.note(note)
        self.parser.schema = builder.schema   # (its validator and column converters with it)
        self.builder = builder
        return builder

    def _plan_rows(self) -> int:
        """Every row of the input, rendered, checked and stored (inside the plan's transaction)."""
        spec, job = self.spec, self.job
        source = job.source
        builder: Optional[RequestBuilder] = None
        index = 0
        self._first = first = FirstBodies(spec.batch_size)   # (its run sends them first: see bodies.py)
        # the next block is read while this one is rendered and the one before it stored (threads that run
        # mostly without the GIL); what either raises is raised here, and the plan's transaction rolls back
        with Behind(self._store_block) as writer:
            for batch, text in prefetched(source.batches_with_text()):
                if builder is None:
                    try:
                        if spec.id_column and spec.id_column not in batch.schema.names:
                            raise InputError(f"id_column: column {spec.id_column!r} is not in {spec.input} "
                                             f"(columns: {', '.join(batch.schema.names[:12])})")
                        builder = self._builder_for(batch.schema)
                    except InputError:
                        source.widen()   # a JSONL key first seen past the first block: read again knowing it
                        raise
                    check = RowCheck(builder, job.model, rules_version(spec.api_version))
                    # an answer is reused only from the same service, under the same API version
                    hash_ = params_hasher(shared_params_hash(canonical_json(builder.shared), job.endpoint,
                                                             spec.api_version))
                    self.prefix = splice_prefix(builder.shared)
                n = batch.num_rows
                if spec.id_column:
                    raw_ids = batch.column(spec.id_column).to_pylist()   # as shown in messages
                    ids = custom_ids(text.column(spec.id_column))      # (as written; None: one by one)
                    if ids is None:
                        ids = []
                        for i, value in enumerate(text.column(spec.id_column).to_pylist()):
                            if value is None or (isinstance(value, str) and value.strip() == ""):
                                raise InputError(f"{spec.input}: row {index + i + 1}: id column "
                                                 f"{spec.id_column!r} is empty")
                            ids.append(custom_id_for(value))
                else:
                    raw_ids = None
                    ids = [f"row-{index + i}" for i in range(n)]
                bodies = builder.plain_bodies(text)   # a plain template's rows at once (plain.py)
                if bodies is not None:
                    if not check.seen:   # (the shared params are checked with the first row, as row by row)
                        where = self._where(index, raw_ids, 0)
                        check(builder.row_part(builder.rows(batch.slice(0, 1), text.slice(0, 1))[0], where), where)
                    records = [(job.id, cid, i, hash_(body), *row_figures(spec, body, None), None)
                               for i, cid, body in zip(itertools.count(index), ids, bodies)]
                else:
                    rows = builder.rows(batch, text)
                    records, bodies = [], []
                    for i in range(n):
                        where = self._where(index, raw_ids, i)
                        try:
                            part = builder.row_part(rows[i], where)
                        except InputError:
                            source.widen()   # a key inside an object first seen past the first block (meta.late)
                            raise
                        check(part, where)
                        body = canonical_json(part)   # (not stored unless it cannot be rendered again: bodies.py)
                        bodies.append(body)
                        records.append((job.id, ids[i], index + i, hash_(body), *row_figures(spec, body, part),
                                        body if builder.keeps_body(rows[i]) else None))
                if len(set(ids)) != n:
                    seen: dict = {}
                    for i, cid in enumerate(ids):
                        if cid in seen:
                            raise self._duplicate(raw_ids[i] if raw_ids else cid, seen[cid], index + i)
                        seen[cid] = index + i
                writer.put((records, ids, raw_ids, index))
                if first.rows:
                    first.add(index, bodies, records)
                index += n
        if index == 0:
            if spec.shard:
                raise InputError(f"{spec.input}: shard {spec.shard} has no rows (the input has fewer rows than "
                                 "shards, or none)")
            raise InputError(f"{spec.input}: input is empty (no rows)")
        return index

    def _store_block(self, block: tuple) -> None:
        """A block's planned rows stored (in the plan's writer thread, the only one using the store while the
        rows are planned); a custom_id the job already has is named as the duplicate id it is."""
        records, ids, raw_ids, index = block
        try:
            self.store.insert_planned(records)
        except sqlite3.IntegrityError:
            for i, cid in enumerate(ids):
                prior = self.store.row_index_of(self.job.id, cid)
                if prior is not None and prior != index + i:
                    raise self._duplicate(raw_ids[i] if raw_ids else cid, prior, index + i) from None
            raise

    @staticmethod
    def _where(index: int, raw_ids: Optional[list], i: int) -> str:
        """How errors name the row `i` of the block that starts at row `index`."""
        return f"row {index + i + 1}" + (f" (id {raw_ids[i]!r})" if raw_ids else "")

    def _duplicate(self, value, first: int, second: int) -> InputError:
        return InputError(f"{self.spec.input}: duplicate id {value!r} in column {self.spec.id_column!r} "
                          f"(rows {first + 1} and {second + 1})")

    # ---- answers already paid for ----------------------------------------------------------------
    def alone(self) -> bool:
        """True when this job is the only one in its state file (no answers to share, no twins)."""
        return self.store.alone(self.job.id)

    def reuse_answers(self) -> int:
        """Pending rows whose exact request another job in this state file has had answered (and paid
        for) — a reply that fit, or one that did not fit the schema — take that answer: not sent again."""
        if self.alone():
            return 0
        n = self.store.reuse_answers(self.job.id)
        if n:
            log.info("job %s: %d rows reuse answers already paid for in this state file", self.job.short_id, n)
        return n

    # ---- the run's options -----------------------------------------------------------------------
    def apply_options(self, *, resume_canceled: bool = False, resend_lost: bool = False,
                      retry_errored: bool = False) -> None:
        """The run's options, in this order, once the job is planned."""
        if resume_canceled:
            self.resume_canceled()
        if resend_lost:
            self.resend_lost()
        if retry_errored:
            self.retry_errored()

    def resend_lost(self) -> None:
        """Rows whose batch or results the API no longer has are sent again (--resend-lost): paid again."""
        n = self.store.resend_lost(self.job.id)
        if n:
            log.info("job %s: %d rows whose batch or results are gone, or whose result never came, will be sent "
                     "again", self.job.short_id, n)

    def retry_errored(self) -> None:
        """--retry-errored: rows that ended errored (a gateway's own errors, a wrong key, errors whose attempts
        ran out) are sent again, after saying how many and the most they may cost; each starts its attempts
        afresh. Succeeded rows are never sent again; rows whose batch or results are gone, or whose result
        line never came (they may have been paid for), only with --resend-lost."""
        store, job = self.store, self.job
        # (summed as the bodies are rendered: every row of a large job may have ended errored)
        rows, most_usd = 0, Decimal(0)
        for _, _, body in self.bodies(store.planned_rows(job.id, retryable=True)):
            rows += 1
            if most_usd is not None:
                try:
                    most_usd += self.ledger.estimator.request_max(body)
                except InputError:    # an unpriced model (a budget then refuses it below, as every run does)
                    most_usd = None
        if not rows:
            log.info("job %s: --retry-errored: no row ended errored", job.short_id)
            return
        most = f"${most_usd:.6f}" if most_usd is not None else "an unknown amount (the model is not priced)"
        if most_usd is not None and self.spec.max_cost is not None:
            # all of them or none: a budget too small for them leaves them errored, their errors kept (a
            # later run without the flag must not send them)
            why = self.ledger.over(most_usd, f"--retry-errored: the {rows} rows that ended errored")
            if why is not None:
                raise BudgetError(self.ledger.stop_message(why + " (nothing sent: they stay errored)",
                                                           store.counts(job.id)))
        canceled = store.canceled_at(job.id)
        # a canceled job too: sending its errored rows is what was asked (else they would end canceled,
        # their errors lost); its canceled rows stay canceled unless --resume-canceled
        n = store.retry_errored(job.id)
        if canceled:
            log.warning("job %s: --retry-errored: the job was canceled; its errored rows are sent again, its "
                        "canceled rows stay canceled (--resume-canceled sends them)", job.short_id)
        log.warning("job %s: --retry-errored: %d rows that ended errored are sent again; they may cost up to %s%s",
                    job.short_id, n, most, f" (the budget, {budget_text(self.spec.max_cost)}, still holds)"
                    if self.spec.max_cost is not None else "")

    def resume_canceled(self) -> None:
        """--resume-canceled: the job's canceled rows are sent again."""
        n = self.store.resume_canceled(self.job.id)
        if n:
            log.info("job %s: %d canceled rows will be sent again", self.job.short_id, n)

    # ---- write ---------------------------------------------------------------------------------
    def write_output(self) -> int:
        """Every row is final: the input read again and joined to the replies, the output written (atomically)."""
        row = self.store.job(self.job.id)
        source = input_for(self.spec, json.loads(row["column_types"] or "{}"))
        writer = OutputWriter(self.store, self.job.id, self.builder.schema if self.builder is not None else None,
                              text_prefix=self.spec.prefill if self.spec.prefill_in_text else None)
        # rows are joined to their replies by position: only the input that was planned may be joined,
        # so it is checked before the output is written, and again before it is put in place
        check = lambda: self.check_input_unchanged(source)   # noqa: E731
        check()
        n = writer.write(source, self.spec.output, partition_by=self.spec.partition_by, before_swap=check)
        log.info("job %s: wrote %d rows to %s", self.job.short_id, n, self.spec.output)
        return n

    def check_input_unchanged(self, source: InputSource) -> None:
        """Refuse to write when the input is no longer the one this job planned (edited while it ran)."""
        if source.fingerprint() == self.job.fingerprint:
            return
        message = (f"{self.spec.input} changed while the job ran (it is no longer the input that was planned and "
                   "sent): nothing written, since its rows would be joined to other rows' replies. Run the same "
                   "command again: the changed input is a new job, whose unchanged requests reuse the replies "
                   "already paid for")
        self.store.record_event(self.job.id, "error", message)
        raise InputError(message)
