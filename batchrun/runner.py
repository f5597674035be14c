"""The state machine that moves a job forward: plan → submit → poll → collect → retry → write.

Each step is idempotent and committed to the state file before the next one starts, so `run` can
be killed at any moment and called again (from cron, say) to pick up exactly where it stopped:

* plan     — read the input once, render every row, store each request (custom_id, body, hash) in
             one transaction. Nothing is sent before the whole input has been validated.
* submit   — for each chunk of pending requests: choose them and commit an *intent* (the batch's
             members, the time) in one transaction, POST the batch, commit its id. A create whose
             reply is lost, or that a killed run left under way, is resolved through the list endpoint
             (adopt the batch once its results prove it this job's), never by sending again blindly.
* poll     — retrieve in-flight batches with backoff until they end.
* collect  — stream results line by line, match by custom_id, record; a download cut short is
             downloaded again; a batch is collected only when every member has its result.
* retry    — expired requests go back to pending, up to max_attempts; rows whose errored result is the
             service's error, not the request's (results.retry_rule), go back without using an attempt.
* write    — stream the input again, join each record batch to its results, write atomically.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from decimal import Decimal
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import pyarrow as pa

from .api import (ApiClient, AsyncClient, BUILTIN_EMULATOR, DEFAULT_BASE_URL, LEGACY_LOOPBACK, endpoint_key, endpoint_text,
                  is_anthropic_api,
                  is_loopback_endpoint)
from . import failpoints
from .adoption import Adoption
from .batches import BatchDriver
from .collector import Collector, ServiceErrors
from .context import BatchContext, RunCounters
from .errors import BudgetError, ExitCode, InputError, LockedError, NotFoundError
from .inputs import ColumnTypeConflict, InputSource
from .models import Catalog, CatalogError, ModelInfo, load_catalog
from .output import OutputWriter, check_column_names, check_partition, check_writable
from .requests import (RequestBuilder, RowCheck, canonical_json, custom_id_for, full_body, output_schema_for,
                       params_hash, shared_params_hash, splice_prefix)
from .results import ResultParser
from .prefetch import prefetched
from .spec import JobSpec, cached_prefix_tokens, check_api_version, default_cache_ttl, rules_version
from .budget import BudgetLedger
from .summary import budget_text, find_job, job_cost
from .store import FINAL_STATES, LOST_ERRORS_SQL, JobLock, Store, existing_state, now_iso

log = logging.getLogger("batchrun")

@dataclass
class Progress:
    job_id: str
    total: int
    counts: dict
    batches_in_flight: int
    batches_total: int
    cost_usd: Optional[float]
    elapsed: float
    mode: str = "batch"
    url: Optional[str] = None     # messages mode: the URL requests are sent to (base URL and prefix included)
    priming: int = 0            # requests of a batch in flight that primes the cache (the rest waits for it)

    @property
    def done(self) -> int:
        return sum(self.counts.get(s, 0) for s in FINAL_STATES)

    @property
    def failed(self) -> int:
        return self.done - self.counts.get("succeeded", 0)


@dataclass
class RunResult:
    job_id: str
    finished: bool
    counts: dict
    cost_usd: Optional[float]
    output: Optional[str]
    exit_code: int
    rows: int = 0
    batches_created: int = 0
    notes: list = field(default_factory=list)
    sent: int = 0                       # requests this run sent (in batches it created, or over messages)
    replies: int = 0                    # replies this run recorded that the job paid for
    run_cost_usd: Optional[float] = 0.0   # what those replies cost (None if unpriced)

    @property
    def failed(self) -> int:
        return sum(n for s, n in self.counts.items() if s not in ("succeeded", "pending", "in_flight"))


@dataclass
class CancelResult:
    job_id: str
    batches_canceled: int       # batches a cancel was sent for
    batches_running: int        # batches of the job not ended yet (the wait ran out, or was skipped)
    counts: dict                # rows by state after the cancel


@dataclass
class Step:
    """One round of a run (Runner.step)."""
    changed: bool           # something moved: a batch ended, results were recorded, a reply came
    over: Optional[str]     # why the budget let nothing more be sent (None: it did not stop it)
    counts: dict            # rows by state after the round
    sent: int               # batches created (or adopted) this round; messages mode: rows answered


def resolve_connection(api_key: Optional[str], base_url: Optional[str]) -> tuple[Optional[str], str, str]:
    """Key and base URL as the official SDK reads them; returns (key, key_source, base_url)."""
    if api_key:
        source = "--api-key"
    else:
        api_key, source = os.environ.get("ANTHROPIC_API_KEY"), "ANTHROPIC_API_KEY"
    base = base_url or os.environ.get("ANTHROPIC_BASE_URL") or DEFAULT_BASE_URL
    return api_key, source, base


def warnings_for(spec: JobSpec, model: Optional[ModelInfo], builder: Optional[RequestBuilder]) -> list:
    """Things that will work but probably not as the user hopes."""
    out = []
    if model is None:
        return out
    if spec.cache_system and (spec.system or spec.few_shot):
        approx = cached_prefix_tokens(spec)
        minimum = model.cache_min_tokens
        what = "the system prompt" if not spec.few_shot else "the cached prefix (system prompt and few-shot turns)"
        if minimum is None:
            out.append(f"cache_system: the minimum cacheable prompt of {spec.model} is not known; "
                       "check cache_creation_input_tokens in the output")
        elif approx < minimum:
            out.append(f"cache_system: {what} is about {approx} tokens, below the {minimum}-token "
                       f"minimum {spec.model} caches: it will not be cached")
    elif spec.cache_system:
        out.append("cache_system: there is no system prompt (or few-shot turns) to cache")
    thinking = (spec.thinking or {}).get("type") or model.thinking_default
    if thinking in ("enabled", "adaptive"):
        budget = (spec.thinking or {}).get("budget_tokens") or 0
        room = spec.max_tokens - budget
        if spec.max_tokens < 1024 or (budget and room < 256):
            out.append(f"max_tokens: {spec.model} thinks ({thinking}) within max_tokens = {spec.max_tokens}; "
                       "leave room for the answer (e.g. max_tokens ≥ 1024 above any thinking budget)")
    return out


class Job:
    """A job made ready to run: its spec checked against the catalog, its input opened and hashed.

    Nothing here touches the network.
    """

    def __init__(self, spec: JobSpec, *, catalog: Optional[Catalog] = None, allow_unknown_model: bool = False,
                 endpoint: Optional[str] = None, job_id: Optional[str] = None):
        self.spec = spec
        self.endpoint = endpoint   # endpoint_key() of the service the job is sent to
        try:
            self.catalog = catalog or load_catalog(spec.models_file)
        except CatalogError as exc:
            raise InputError(str(exc)) from None
        self.model: Optional[ModelInfo] = self.catalog.resolve(spec.model)
        if self.model is None and not allow_unknown_model:
            raise InputError(f"model: unknown model {spec.model!r} (not in the model catalog; add it with "
                             "--models FILE, or pass --allow-unknown-model to run it with cost unknown)")
        if self.model is not None and job_id is None and not self.catalog.is_listed(spec.model):
            log.warning("model: %s is not in the model catalog; it is taken as a snapshot of %s (its prices and "
                        "rules); add it with --models-file FILE if it differs", spec.model, self.model.id)
        self.store = Store(spec.state_path)
        self.legacy_loopback: Optional[str] = None   # see Runner._continue_legacy_loopback
        if job_id is None:
            self.source = InputSource(spec.input, limit=spec.limit, shard=spec.shard_pair, shard_key=spec.id_column)
            self.fingerprint = self.source.fingerprint()
            self.id = self.id_for(spec)
            if endpoint is not None and not self.store.job(self.id):
                # planned before the endpoint was part of a job's identity (its endpoint not kept): it is
                # this job, with its batches in flight and its answers, not a new one to pay for again
                legacy = self.store.job(spec.identity(self.fingerprint))
                if legacy is not None and legacy["endpoint"] is None:
                    self.id = legacy["id"]
                elif is_loopback_endpoint(endpoint):
                    # planned when every loopback URL counted as one endpoint: this job only if this
                    # server proves it (Runner._continue_legacy_loopback)
                    legacy = self.store.job(spec.identity(self.fingerprint, LEGACY_LOOPBACK))
                    if legacy is not None and legacy["endpoint"] == LEGACY_LOOPBACK:
                        self.legacy_loopback = legacy["id"]
            if spec.cache_ttl_defaulted and spec.cache_ttl == "1h" and not self.store.job(self.id) \
                    and self.legacy_loopback is None:
                self._five_minute_job(spec)
        else:  # a job already in the state file, its input not read (see Runner.for_stored_job)
            self.source, self.fingerprint, self.id = None, None, job_id

    def _five_minute_job(self, spec: JobSpec) -> None:
        """A cached batch job planned when batch jobs cached for 5 minutes by default is that job, with its
        5-minute requests, not a new one to pay for again."""
        old = dataclasses.replace(spec, cache_ttl="5m")
        row = self.store.job(self.id_for(old))
        if row is None and self.endpoint is not None:   # (and planned before the endpoint was kept)
            row = self.store.job(old.identity(self.fingerprint))
            row = row if row is not None and row["endpoint"] is None else None
        if row is not None:
            self.id, spec.cache_ttl = row["id"], "5m"
            log.info("job %s: planned with the 5-minute cache (the default then): it keeps it", self.short_id)

    def id_for(self, spec: JobSpec) -> str:
        """The id `spec` has over this job's input, endpoint and catalog (this job's own id for its own spec)."""
        return spec.identity(self.fingerprint, self.endpoint, self.catalog.fingerprint)

    @property
    def short_id(self) -> str:
        return self.id[:12]

    def close(self) -> None:
        self.store.close()


def sent_elsewhere(job_id: str, sent_to: Optional[str], here: Optional[str]) -> Optional[str]:
    """Why a stored job cannot be moved on through the endpoint `here` (an `endpoint_key`, "" or None
    for the Anthropic API): it was sent to `sent_to` (its recorded endpoint; None: not recorded)."""
    if sent_to is None or sent_to == (here or ""):
        return None
    hint = ("only `batchrun run --emulator` moves it on (the emulator's batches end with the command that "
            "started it)" if sent_to == BUILTIN_EMULATOR else
            "set ANTHROPIC_BASE_URL (or --base-url, base_url=) to its endpoint")
    return f"job {job_id[:12]} was sent to {endpoint_text(sent_to)}, not to {endpoint_text(here or None)}: {hint}"


class Runner:
    """Runs one job. The library API (`batchrun.run`) and the CLI both go through here."""

    def __init__(self, spec: JobSpec, *, api_key: Optional[str] = None, base_url: Optional[str] = None,
                 transport=None, async_transport=None, client: Optional[ApiClient] = None,
                 catalog: Optional[Catalog] = None,
                 allow_unknown_model: bool = False, resume_canceled: bool = False, resend_lost: bool = False,
                 retry_errored: bool = False, wait_lock: bool = False,
                 on_progress: Optional[Callable[[Progress], None]] = None,
                 sleep: Callable[[float], None] = time.sleep, retry=None, job_id: Optional[str] = None,
                 endpoint: Optional[str] = None):
        self.spec = spec
        if endpoint is None:   # (given: the endpoint key of a service known otherwise, e.g. BUILTIN_EMULATOR)
            endpoint = endpoint_key(client.base_url if client is not None else resolve_connection(api_key, base_url)[2])
        self.job = Job(spec, catalog=catalog, allow_unknown_model=allow_unknown_model, endpoint=endpoint,
                       job_id=job_id)
        self.store = self.job.store
        try:
            version_note = check_api_version(spec.api_version, None if is_anthropic_api(self.job.endpoint)
                                             else self.job.endpoint)
        except InputError:
            self.job.close()
            raise
        self.resume_canceled = resume_canceled
        self.resend_lost = resend_lost
        self.retry_errored = retry_errored
        self.wait_lock = wait_lock
        self.on_progress = on_progress
        self.sleep = sleep
        self._client = client
        self._owns_client = client is None   # a client given to it is closed by whoever gave it
        # transport: an httpx transport for batch mode (tests run the emulator in process with it);
        # async_transport: the same for messages mode, which sends with an async client
        self._client_args = dict(api_key=api_key, base_url=base_url, transport=transport,
                                 async_transport=async_transport, retry=retry)
        self.parser = ResultParser(self.job.catalog, spec.model, schema=output_schema_for(spec),
                                   batch=spec.mode == "batch", cache_ttl=spec.cache_ttl)
        self.notes: list[str] = []
        if version_note:
            self.notes.append(version_note)
            log.warning("%s", version_note)
        self._started = time.monotonic()
        self._paid_before: Optional[tuple] = None      # (replies paid, cost) when this run began
        self._twins: dict = {}                         # job id -> Runner of another job moved forward here
        self.ledger = BudgetLedger(spec, self.store, self.job, lambda: self.estimator)   # max_cost (budget.py)
        # batch mode's drivers (batches.py, adoption.py, collector.py), handed what they need
        self.counters = RunCounters()                  # this run's batches created and requests sent
        self.service_errors = ServiceErrors()          # errored results that were the service's (batch mode)
        ctx = BatchContext(spec=spec, store=self.store, job=self.job, client=lambda: self.client, parser=self.parser,
                           ledger=self.ledger, full_body=self.full_body, sleep=sleep, counters=self.counters)
        self.adoption = Adoption(ctx)   # (a bad BATCHRUN_CREATE_GRACE is refused here, before anything is sent)
        self.collector = Collector(ctx, self.adoption, self.service_errors)
        self.batches = BatchDriver(ctx, self.adoption, self.collector, self._move_twin)

    # ---- the client, created only when needed -----------------------------------------------------
    @property
    def client(self) -> ApiClient:
        if self._client is None:
            self._client = ApiClient(**self._connection(), transport=self._client_args["transport"], sleep=self.sleep)
        return self._client

    def _connection(self) -> dict:
        """What the job's clients are made with: the sync one (batches) and messages mode's async one."""
        a = self._client_args
        key, source, base = resolve_connection(a["api_key"], a["base_url"])
        return dict(api_key=key, key_source=source, base_url=base, api_version=self.spec.api_version,
                    auth_header=self.spec.auth_header, extra_headers=self.spec.headers, retry=a["retry"])

    def check_connection_settings(self) -> None:
        """Fail fast on a missing key or an insecure base URL (before reading the input)."""
        self.client  # noqa: B018 - constructing the client validates both

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def close(self) -> None:
        for twin in self._twins.values():
            twin.close()
        if self._client is not None and self._owns_client:
            self._client.close()
        self.job.close()

    @contextlib.contextmanager
    def locked(self, refused: Optional[str] = None):
        """Hold this job's lock: one run (or cancel, or estimate) at a time per job and state file.
        `refused`: the message when another run holds it (and we do not wait)."""
        self.identify()   # (which job this is may take the server's word: before its lock)
        lock = JobLock(self.spec.state_path, self.job.id)
        try:
            lock.acquire()
        except LockedError:
            if not self.wait_lock:
                if refused:
                    raise LockedError(refused) from None
                raise
            log.info("job %s: another run holds this job; waiting for it to finish (--wait-lock)", self.job.short_id)
            lock.acquire(wait=True)
        try:
            yield
        finally:
            lock.release()

    # ---- the whole run -------------------------------------------------------------------------
    def run(self, wait: bool = True) -> RunResult:
        spec = self.spec
        self.check_connection_settings()
        check_writable(spec.output, spec.partition_by)
        with self.locked():
            self.start()
            backoff = 1.0
            while True:
                step = self.step()
                counts = step.counts
                self._report(counts)
                if not counts.get("pending") and not counts.get("in_flight"):
                    break
                self.stop_over_budget(step, wait)
                if not wait:
                    return self.result(counts, finished=False, exit_code=ExitCode.IN_PROGRESS)
                self.sleep(min(backoff, spec.poll_interval))
                backoff = 1.0 if step.changed else min(backoff * 2, spec.poll_interval)
            return self.finish()

    # ---- the steps of a run (the library's Job calls them one by one) ------------------------------
    def step(self, collect: bool = True) -> Step:
        """One round of a run, under the job's lock (after `start`); never waits. Batch mode: resolve the
        creates whose reply was lost, poll the batches and collect those that ended (unless `collect` is
        False), take answers another job paid for, and send what the budget allows. Messages mode: take
        answers paid for, and send every pending row the budget allows."""
        self.ledger.new_round()
        before = self.counters.batches_created
        if self.spec.mode == "messages":
            self.reuse_answers()
            over = self.ledger.check()
            pending = 0 if over else self.store.counts(self.job.id).get("pending", 0)
            changed = False if over else self.messages_step()
            counts = self.store.counts(self.job.id)
            return Step(changed, over, counts, 0 if over else pending - counts.get("pending", 0))
        self.adoption.resolve_intents()
        changed = False
        if collect:
            changed = self.collector.poll()
            self.service_errors.check(self.job.short_id)   # stops a run that keeps meeting them
        self.reuse_answers()
        over = self.ledger.check()
        if not over:
            self.batches.submit()
        return Step(changed, over, self.store.counts(self.job.id), self.counters.batches_created - before)

    def stop_over_budget(self, step: Step, wait: bool = True) -> None:
        """Raise BudgetError when the budget stopped sending and waiting cannot help: nothing is in flight
        whose cost could settle below its reservation (or, without waiting, the rows still to send do not
        fit)."""
        counts = step.counts
        stop = step.over or self.ledger.held
        if stop and (counts.get("pending") or counts.get("in_flight")) and \
                (not counts.get("in_flight") or (step.over and not wait)):
            raise BudgetError(self.ledger.stop_message(stop, counts))

    def submit_step(self) -> int:
        """`Job.submit`: one round that sends (no poll, no download); the batches created (messages mode:
        the rows answered). Under the job's lock, after `start`."""
        step = self.step(collect=False)
        self.stop_over_budget(step)
        return step.sent

    def poll_step(self) -> bool:
        """`Job.poll`: bring the status of the job's batches up to date (nothing downloaded). True once
        nothing is in flight. Under the job's lock."""
        self.adoption.resolve_intents()
        self.collector.poll(collect=False)
        return not self.store.batches_unended(self.job.id)

    def collect_step(self) -> RunResult:
        """`Job.collect`: record the results of every ended batch; once every row is final, write the
        output. Under the job's lock, after `start`."""
        self.collector.poll()
        counts = self.store.counts(self.job.id)
        if counts.get("pending") or counts.get("in_flight"):
            return self.result(counts, finished=False, exit_code=ExitCode.IN_PROGRESS)
        return self.finish()

    # (batch mode's drivers, by their old names)
    def submit(self) -> int:
        return self.batches.submit()

    def resolve_intents(self) -> None:
        self.adoption.resolve_intents()

    def poll(self, collect: bool = True) -> bool:
        return self.collector.poll(collect)

    @property
    def batches_created(self) -> int:
        return self.counters.batches_created

    @property
    def requests_sent(self) -> int:
        return self.counters.requests_sent

    @requests_sent.setter
    def requests_sent(self, n: int) -> None:
        self.counters.requests_sent = n

    def _move_twin(self, job_id: str) -> None:
        """Poll and collect another job's batches as its own run would (see BatchDriver.silent_twins): one
        runner per job for the run, so that its download rounds are counted as its own run counts them."""
        twin = self._twins.get(job_id)
        if twin is None:
            twin = self._twins[job_id] = Runner.for_stored_job(self.spec.state_path, job_id, client=self.client,
                                                               sleep=self.sleep)
        twin.resolve_intents()
        twin.poll()

    def start(self) -> None:
        """What every run does first, under the job's lock: plan (once), and apply the run's options."""
        self.plan()
        if self.resume_canceled:
            self._resume_canceled()
        if self.resend_lost:
            self._resend_lost()
        if self.retry_errored:
            self._retry_errored()
        self.ledger.record_max_cost()
        self._paid_before = self._paid()

    def finish(self) -> RunResult:
        """Every row is final: write the output, mark the job finished, and say how it ended."""
        store, job = self.store, self.job
        rows = self.write_output()
        counts = store.counts(job.id)
        with store.transaction():
            store.conn.execute("UPDATE jobs SET finished_at = coalesce(finished_at, ?), output_written_at = ? "
                               "WHERE id = ?", (now_iso(), now_iso(), job.id))
        failed = sum(n for s, n in counts.items() if s != "succeeded")
        result = self.result(counts, finished=True, exit_code=ExitCode.FAILED_ROWS if failed else ExitCode.OK)
        result.rows = rows
        return result

    def estimate(self):
        """Plan the job (locally) and estimate what is still to be paid; sends no batch."""
        self.check_connection_settings()
        with self.locked():
            self.plan()
            return self.estimator.estimate()

    def identify(self) -> str:
        """This job's id, once settled: a job planned under the old loopback key is this one only when
        this server proves it (see _continue_legacy_loopback); asked before the lock, as `locked` asks."""
        self._continue_legacy_loopback()
        return self.job.id

    def _continue_legacy_loopback(self) -> None:
        """A job planned when every loopback URL counted as one endpoint (its port not recorded) is this
        job only when this server proves it (see _claim_legacy_loopback); otherwise (another server on
        loopback, an emulator since restarted) its replies are not this server's: this is a new job."""
        legacy = self.job.legacy_loopback
        if legacy is None or self.store.job(self.job.id):
            return
        self.job.legacy_loopback = None   # asked once
        if self._claim_legacy_loopback(legacy):
            self.job.id = legacy
            log.info("job %s: continued at %s (it knows the job's batches)", legacy[:12], self.job.endpoint)
        else:
            log.info("job %s was planned for a loopback address whose port was not recorded, and %s does not "
                     "know its batches: this is a new job", legacy[:12], self.job.endpoint)

    def _claim_legacy_loopback(self, legacy: str) -> bool:
        """Whether this server knows the latest batch of a job keyed "http://loopback" (a batch id is the
        API's own, random): then the job was sent here, and is recorded so — its endpoint in full, its
        requests keyed to it — and nothing it paid for is paid again."""
        latest = self.store.one("SELECT api_id FROM batches WHERE job_id = ? AND api_id IS NOT NULL "
                                "ORDER BY id DESC LIMIT 1", (legacy,))
        if latest is None:
            return False
        try:
            batch = self.client.retrieve_batch(latest["api_id"])
        except NotFoundError:
            return False
        if not isinstance(batch, dict) or batch.get("id") != latest["api_id"]:   # a reply, but not about that batch
            return False
        self.store.move_job(legacy, self.job.endpoint)
        return True

    def result(self, counts: dict, *, finished: bool, exit_code: int) -> RunResult:
        """How the run stands: its counts, its cost, what it sent and paid (exit_code as the CLI ends)."""
        cost = self.cost()
        if self.parser.unpriced or (self.job.model is not None and self.job.model.prices is None):
            note = f"cost unknown: {self.spec.model} has no prices in the model catalog (cost_usd is null)"
            if note not in self.notes:
                self.notes.append(note)
                log.warning(note)
        if self.parser.unreadable_usage:
            note = (f"{self.parser.unreadable_usage} replies of this run reported usage that cannot be right "
                    "(counts that are not whole non-negative numbers): recorded as missing, priced at $0")
            if note not in self.notes:
                self.notes.append(note)
                log.warning(note)
        replies, paid = self._paid()
        before_n, before_cost = self._paid_before or (replies, paid)
        run_cost = None if paid is None or before_cost is None else round(paid - before_cost, 10)
        return RunResult(job_id=self.job.id, finished=finished, counts=counts, cost_usd=cost,
                         output=self.spec.output if finished else None, exit_code=exit_code,
                         batches_created=self.batches_created, notes=list(self.notes), sent=self.requests_sent,
                         replies=replies - before_n, run_cost_usd=run_cost)

    def _paid(self) -> tuple[int, Optional[float]]:
        """(replies the job paid for, what they cost) now: a run's own share is the change over the run."""
        n = self.store.paid_rows(self.job.id)
        return n, self.cost()

    def cost(self) -> Optional[float]:
        return job_cost(self.store, self.job.id)

    def _report(self, counts: dict) -> None:
        if self.on_progress is None:
            return
        b = self.store.batch_totals(self.job.id)
        total = sum(counts.values())
        self.on_progress(Progress(job_id=self.job.id, total=total, counts=counts, batches_in_flight=b["live"],
                                  batches_total=b["total"], cost_usd=self.cost(),
                                  elapsed=time.monotonic() - self._started, mode=self.spec.mode,
                                  url=self._client.full_url("v1/messages") if self._client is not None else None,
                                  priming=self.store.primer_requests(self.job.id)))

    # ---- plan ----------------------------------------------------------------------------------
    def plan(self) -> None:
        """Read, validate and render the whole input, and store its requests: all or nothing."""
        store, job, spec = self.store, self.job, self.spec
        existing = store.job(job.id) or self._take_over_other_mode()
        if existing and existing["planned_at"]:
            self._load_plan(existing)
            return
        while True:
            try:
                with store.transaction():
                    store.conn.execute(
                        "INSERT OR REPLACE INTO jobs (id, name, spec, input, output, input_fingerprint, mode, model, "
                        "endpoint, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (job.id, spec.name, spec.to_json(), spec.input, spec.output, job.fingerprint, spec.mode,
                         spec.model, job.endpoint or "", now_iso()))
                    n = self._plan_rows()
                    failpoints.hit("plan")
                    if job.source.fingerprint() != job.fingerprint:   # the rows read are not the job's input
                        raise InputError(f"{spec.input} changed while it was being read: nothing planned, nothing "
                                         "sent; run the same command again once it is written")
                    store.conn.execute("UPDATE jobs SET planned_at = ?, rows = ?, column_types = ?, shared_params = ? "
                                       "WHERE id = ?",
                                       (now_iso(), n, json.dumps(job.source.pins()),
                                        canonical_json(self.builder.shared), job.id))
                    store.event(job.id, "info", f"planned {n} requests")
                break
            except ColumnTypeConflict:   # the source pinned what did not hold: plan again from the start
                pass
        for warning in warnings_for(spec, job.model, self.builder):
            log.warning("%s", warning)
        self.reuse_answers()
        log.info("job %s: %d rows planned (%s, model %s)", job.short_id, n, spec.input, spec.model)

    def _take_over_other_mode(self) -> Optional[dict]:
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

    def _load_plan(self, row: dict) -> None:
        self.job.source.pin(json.loads(row["column_types"] or "{}"))
        self._builder_for(self.job.source.schema)
        self.prefix = splice_prefix(json.loads(row["shared_params"])) if row["shared_params"] else None

    def full_body(self, row_body: str) -> str:
        """The full params JSON of a stored request."""
        return full_body(self.prefix, row_body)

    def _builder_for(self, input_schema: pa.Schema) -> RequestBuilder:
        columns = input_schema.names
        builder = RequestBuilder(self.spec, self.job.model, columns, input_name=self.spec.input)
        check_partition(input_schema, builder.schema, self.spec.partition_by, self.spec.input)
        for note in check_column_names(columns, builder.schema):
            if note not in self.notes:
                self.notes.append(note)
                log.warning("%s", note)
        self.parser.schema = builder.schema   # (its validator and column converters with it)
        self.builder = builder
        return builder

    def _plan_rows(self) -> int:
        spec, job, conn = self.spec, self.job, self.store.conn
        source = job.source
        builder: Optional[RequestBuilder] = None
        index = 0
        for batch, text in prefetched(source.batches_with_text()):   # the next block is read while this one is planned
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
                shared_hash = shared_params_hash(canonical_json(builder.shared), job.endpoint, spec.api_version)
                self.prefix = splice_prefix(builder.shared)
            n = batch.num_rows
            if spec.id_column:
                raw_ids = batch.column(spec.id_column).to_pylist()   # as shown in messages
                ids = []
                for i, value in enumerate(text.column(spec.id_column).to_pylist()):   # as written
                    if value is None or (isinstance(value, str) and value.strip() == ""):
                        raise InputError(f"{spec.input}: row {index + i + 1}: id column {spec.id_column!r} is empty")
                    ids.append(custom_id_for(value))
            else:
                raw_ids = None
                ids = [f"row-{index + i}" for i in range(n)]
            rows = builder.rows(batch, text)
            records, bodies = [], []
            for i in range(n):
                where = f"row {index + i + 1}" + (f" (id {raw_ids[i]!r})" if raw_ids else "")
                try:
                    part = builder.row_part(rows[i], where)
                except InputError:
                    source.widen()   # a key inside an object first seen past the first block (meta.late): read again
                    raise
                check(part, where)
                body = canonical_json(part)
                records.append((job.id, ids[i], index + i, params_hash(body, shared_hash)))
                bodies.append(body)
            if len(set(ids)) != n:
                seen: dict = {}
                for i, cid in enumerate(ids):
                    if cid in seen:
                        raise self._duplicate(raw_ids[i] if raw_ids else cid, seen[cid], index + i)
                    seen[cid] = index + i
            try:
                # bodies get consecutive ids after the largest one (inside the plan's transaction)
                base = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM bodies").fetchone()[0]
                conn.executemany("INSERT INTO bodies (id, body) VALUES (?, ?)", zip(range(base, base + n), bodies))
                conn.executemany("INSERT INTO requests (job_id, custom_id, row_index, params_hash, body_id) "
                                 "VALUES (?, ?, ?, ?, ?)", [(*r, base + i) for i, r in enumerate(records)])
            except sqlite3.IntegrityError:
                for i, cid in enumerate(ids):
                    prior = conn.execute("SELECT row_index FROM requests WHERE job_id = ? AND custom_id = ?",
                                         (job.id, cid)).fetchone()
                    if prior is not None and prior[0] != index + i:
                        raise self._duplicate(raw_ids[i] if raw_ids else cid, prior[0], index + i) from None
                raise
            index += n
        if index == 0:
            if spec.shard:
                raise InputError(f"{spec.input}: shard {spec.shard} has no rows (the input has fewer rows than "
                                 "shards, or none)")
            raise InputError(f"{spec.input}: input is empty (no rows)")
        return index

    def _duplicate(self, value, first: int, second: int) -> InputError:
        return InputError(f"{self.spec.input}: duplicate id {value!r} in column {self.spec.id_column!r} "
                          f"(rows {first + 1} and {second + 1})")

    # ---- answers already paid for ----------------------------------------------------------------
    def _alone(self) -> bool:
        """True when this job is the only one in its state file (no answers to share, no twins)."""
        return self.store.alone(self.job.id)

    def reuse_answers(self) -> int:
        """Pending rows whose exact request another job in this state file has had answered (and paid
        for) — a reply that fit, or one that did not fit the schema — take that answer: not sent again."""
        store, job = self.store, self.job
        if self._alone():
            return 0
        copied = ("state", "text", "parsed", "stop_reason", "model", "input_tokens", "output_tokens",
                  "cache_creation_input_tokens", "cache_read_input_tokens", "api_batch_id", "error_type",
                  "error_message")
        rows = store.conn.execute(
            "SELECT r.custom_id, o.job_id, " + ", ".join(f"o.{c}" for c in copied) + " "
            "FROM requests r JOIN requests o ON o.params_hash = r.params_hash "
            "AND o.state IN ('succeeded', 'invalid_output') AND o.job_id != r.job_id AND o.reused_from IS NULL "
            "WHERE r.job_id = ? AND r.state = 'pending' GROUP BY r.custom_id", (job.id,)).fetchall()
        if not rows:
            return 0
        with store.transaction():
            store.conn.executemany(
                "UPDATE requests SET reused_from = ?, " + ", ".join(f"{c} = ?" for c in copied) +
                ", result_type = state, cost_usd = 0.0, finished_at = ? WHERE job_id = ? AND custom_id = ?",
                [(r[1], *r[2:], now_iso(), job.id, r[0]) for r in rows])
            store.event(job.id, "info", f"{len(rows)} rows answered by earlier jobs: not sent again")
        log.info("job %s: %d rows reuse answers already paid for in this state file", job.short_id, len(rows))
        return len(rows)

    def _resend_lost(self) -> None:
        """Rows whose batch or results the API no longer has are sent again (--resend-lost): paid again."""
        with self.store.transaction():
            n = self.store.conn.execute(
                "UPDATE requests SET state = 'pending', batch_id = NULL, api_batch_id = NULL, result_type = NULL "
                f"WHERE job_id = ? AND state = 'errored' AND error_type IN {LOST_ERRORS_SQL}",
                (self.job.id,)).rowcount
            if n:
                self.store.conn.execute("UPDATE jobs SET finished_at = NULL WHERE id = ?", (self.job.id,))
        if n:
            log.info("job %s: %d rows whose batch or results are gone, or whose result never came, will be sent "
                     "again", self.job.short_id, n)

    def _retry_errored(self) -> None:
        """--retry-errored: rows that ended errored (a gateway's own errors, a wrong key, errors whose attempts
        ran out) are sent again, after saying how many and the most they may cost; each starts its attempts
        afresh. Succeeded rows are never sent again; rows whose batch or results are gone, or whose result
        line never came (they may have been paid for), only with --resend-lost."""
        store, job = self.store, self.job
        rows = store.conn.execute(
            "SELECT b.body FROM requests r JOIN bodies b ON b.id = r.body_id WHERE r.job_id = ? AND r.state = 'errored' "
            f"AND coalesce(r.error_type, '') NOT IN {LOST_ERRORS_SQL}", (job.id,)).fetchall()
        if not rows:
            log.info("job %s: --retry-errored: no row ended errored", job.short_id)
            return
        try:
            most_usd: Optional[Decimal] = sum((self.estimator.request_max(body) for (body,) in rows), Decimal(0))
            most = f"${most_usd:.6f}"
        except InputError:    # an unpriced model (a budget then refuses it below, as every run does)
            most_usd, most = None, "an unknown amount (the model is not priced)"
        if most_usd is not None and self.spec.max_cost is not None:
            # all of them or none: a budget too small for them leaves them errored, their errors kept (a
            # later run without the flag must not send them)
            why = self.ledger.over(most_usd, f"--retry-errored: the {len(rows)} rows that ended errored")
            if why is not None:
                raise BudgetError(self.ledger.stop_message(why + " (nothing sent: they stay errored)",
                                                    store.counts(job.id)))
        canceled = store.one("SELECT canceled_at FROM jobs WHERE id = ?", (job.id,))["canceled_at"]
        with store.transaction():
            n = store.conn.execute(
                "UPDATE requests SET state = 'pending', attempts = 0, free_sends = 0, batch_id = NULL, api_batch_id = NULL, "
                "result_type = NULL, error_type = NULL, error_message = NULL, finished_at = NULL "
                f"WHERE job_id = ? AND state = 'errored' AND coalesce(error_type, '') NOT IN {LOST_ERRORS_SQL}",
                (job.id,)).rowcount
            # a canceled job too: sending its errored rows is what was asked (else they would end canceled,
            # their errors lost); its canceled rows stay canceled unless --resume-canceled
            store.conn.execute("UPDATE jobs SET finished_at = NULL, canceled_at = NULL WHERE id = ?", (job.id,))
            store.event(job.id, "info", f"--retry-errored: {n} errored rows sent again")
        if canceled:
            log.warning("job %s: --retry-errored: the job was canceled; its errored rows are sent again, its "
                        "canceled rows stay canceled (--resume-canceled sends them)", job.short_id)
        log.warning("job %s: --retry-errored: %d rows that ended errored are sent again; they may cost up to %s%s",
                    job.short_id, n, most, f" (the budget, {budget_text(self.spec.max_cost)}, still holds)"
                    if self.spec.max_cost is not None else "")

    def _resume_canceled(self) -> None:
        with self.store.transaction():
            n = self.store.conn.execute("UPDATE requests SET state = 'pending', batch_id = NULL, result_type = NULL "
                                        "WHERE job_id = ? AND state = 'canceled'", (self.job.id,)).rowcount
            self.store.conn.execute("UPDATE jobs SET canceled_at = NULL, finished_at = NULL WHERE id = ?",
                                    (self.job.id,))
        if n:
            log.info("job %s: %d canceled rows will be sent again", self.job.short_id, n)

    # ---- messages mode ---------------------------------------------------------------------------
    def messages_step(self) -> bool:
        """Messages mode: send every pending row over POST /v1/messages, each reply committed at once."""
        from .messages import MessagesDriver
        transport = self._client_args["async_transport"]
        if transport is None and self._client_args["transport"] is not None:
            raise InputError("messages mode sends with an async client: give it an httpx.AsyncBaseTransport "
                             "(such as httpx.ASGITransport) as async_transport, not a sync transport")
        client = AsyncClient(**self._connection(), transport=transport, connections=self.spec.concurrency)
        driver = MessagesDriver(spec=self.spec, store=self.store, job_id=self.job.id, short_id=self.job.short_id,
                                client=client, ledger=self.ledger, full_body=self.full_body,
                                parse=self.parser.message, report=self._report)
        try:
            return driver.run_pending() > 0
        finally:
            self.requests_sent += driver.sent

    # ---- budget --------------------------------------------------------------------------------
    @property
    def estimator(self):
        if getattr(self, "_estimator", None) is None:
            from .estimator import Estimator
            self._estimator = Estimator(self)
        return self._estimator

    # ---- write ---------------------------------------------------------------------------------
    def write_output(self) -> int:
        row = self.store.job(self.job.id)
        source = InputSource(self.spec.input, limit=self.spec.limit, shard=self.spec.shard_pair,
                             shard_key=self.spec.id_column)
        source.pin(json.loads(row["column_types"] or "{}"))
        writer = OutputWriter(self.store, self.job.id, self.builder.schema if hasattr(self, "builder") else None,
                              text_prefix=self.spec.prefill if self.spec.prefill_in_text else None)
        # rows are joined to their replies by position: only the input that was planned may be joined,
        # so it is checked before the output is written, and again before it is put in place
        check = lambda: self._check_input_unchanged(source)   # noqa: E731
        check()
        n = writer.write(source, self.spec.output, partition_by=self.spec.partition_by, before_swap=check)
        log.info("job %s: wrote %d rows to %s", self.job.short_id, n, self.spec.output)
        return n

    def _check_input_unchanged(self, source: InputSource) -> None:
        """Refuse to write when the input is no longer the one this job planned (edited while it ran)."""
        if source.fingerprint() == self.job.fingerprint:
            return
        message = (f"{self.spec.input} changed while the job ran (it is no longer the input that was planned and "
                   "sent): nothing written, since its rows would be joined to other rows' replies. Run the same "
                   "command again: the changed input is a new job, whose unchanged requests reuse the replies "
                   "already paid for")
        with self.store.transaction():
            self.store.event(self.job.id, "error", message)
        raise InputError(message)

    # ---- cancel --------------------------------------------------------------------------------
    CANCEL_WAIT = 60.0   # seconds `cancel` waits, by default, for the batches it canceled to end

    @classmethod
    def for_stored_job(cls, state_path: str, ref: str, **kw) -> "Runner":
        """A runner for a job of a state file (by id, id prefix or name), built from the spec stored there.

        The job's input is not read (it may have changed, or be gone): such a runner can poll, collect
        and cancel the job's batches, but not plan the job or write its output.
        """
        existing_state(state_path)
        with Store(state_path) as store:
            row = find_job(store, ref)
        raw = json.loads(row["spec"])
        if raw.get("headers"):  # stored by name only (their values may be secrets)
            log.warning("job %s: its extra headers (%s) are not stored, so none are sent; if the endpoint needs "
                        "them, give the job file instead of the job id", row["id"][:12], ", ".join(raw["headers"]))
            raw["headers"] = None
        raw["state"] = state_path
        kw.setdefault("allow_unknown_model", True)  # the job was accepted when it was planned
        runner = cls(JobSpec.from_mapping(raw), job_id=row["id"], **kw)
        sent_to, here = row["endpoint"], runner.job.endpoint or ""
        if sent_to == LEGACY_LOOPBACK and is_loopback_endpoint(here) and runner._claim_legacy_loopback(row["id"]):
            sent_to = here
        problem = sent_elsewhere(row["id"], sent_to, here)
        if problem:   # its batches are not there: a 404 would read as "lost"
            runner.close()
            raise InputError(problem)
        return runner

    def cancel(self, wait: float = CANCEL_WAIT) -> CancelResult:
        """Cancel the job: its batches in flight are canceled, its rows not yet sent end canceled.

        Then, for up to `wait` seconds, the job's batches are polled until they end and their results
        are recorded as a run would: rows end canceled, or succeeded if they ran before the cancel.
        Rows that would have been retried end canceled too. Batches still running after `wait` are
        collected by the next run (or the next cancel).
        """
        if not self.store.job(self.job.id):
            raise InputError("this job has not been started in this state file: nothing to cancel")
        with self.locked(refused="another batchrun run holds this job: stop that run (Ctrl-C; the job stays "
                                 "resumable), then cancel again"):
            canceled, running = self.batches.cancel(wait)
            return CancelResult(job_id=self.job.id, batches_canceled=canceled, batches_running=running,
                                counts=self.store.counts(self.job.id))
