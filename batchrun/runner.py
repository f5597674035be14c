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
import itertools
import json
from decimal import Decimal
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import pyarrow as pa

from .api import (ApiClient, BUILTIN_EMULATOR, DEFAULT_BASE_URL, LEGACY_LOOPBACK, endpoint_key, endpoint_text,
                  is_anthropic_api,
                  is_loopback_endpoint)
from . import failpoints
from .errors import (ACCOUNT, AmbiguousCreateError, ApiError, AuthError, BudgetError, ExitCode, GaveUpError,
                     InputError, LockedError, NoBatchApiError, NotFoundError, error_class,
                     RequestTooLargeError, ResultsGoneError, TransientApiError)
from .inputs import ColumnTypeConflict, InputSource
from .models import Catalog, CatalogError, ModelInfo, load_catalog
from .output import OutputWriter, check_column_names, check_partition, check_writable
from .requests import (RequestBuilder, RowCheck, canonical_json, custom_id_for, full_body, new_job_tag,
                       output_schema_for, params_hash, shared_params_hash, splice_prefix, wire_id)
from .results import ATTEMPT, FREE, ResultParser, retry_rule
from .prefetch import prefetched
from .spec import (PRIME_MIN_ROWS, JobSpec, cached_prefix_tokens, check_api_version, default_cache_ttl, primes_cache,
                   rules_version)
from .budget import BudgetLedger
from .summary import PAID, budget_text, find_job, job_cost
from .store import FINAL_STATES, LOST_ERRORS_SQL, PARSED_FIELDS, JobLock, Store, existing_state, now_iso, parse_iso

log = logging.getLogger("batchrun")

MAX_BATCH_BYTES = 256 * 1000 * 1000 - 64 * 1024   # the API's 256 MB, with room for the envelope
MAX_DOWNLOADS = 6                                  # attempts to get a complete results file
MISSING_AFTER = 3                                  # whole downloads again that bring the same file without
                                                   # some rows' lines: those rows end `result_missing`
ADOPT_WINDOW = 600.0                               # seconds of clock skew tolerated when the API's clock is unknown
CLOCK_TOLERANCE = 3.0                              # the Date header's 1 s resolution, plus latency
AMBIGUOUS_GRACE = 60.0                             # a create that failed ambiguously, or was cut off by a
                                                   # crash: how long its batch may take to show in the list
                                                   # before its rows are sent again (BATCHRUN_CREATE_GRACE)
GONE = "gone"                                      # _proof: a candidate whose results can no longer be read
EMPTY = "empty"                                    # _proof: its results file came whole without a line
ADOPTED, PROVEN = 1, 2                             # batches.adopted: found after a lost create; and proved
                                                   # ours by its results before it was adopted
PRIME_LAPSE = 0.75                                 # a cache last touched this share of its TTL ago may lapse
                                                   # before a batch sent now runs: it is primed again
PRIME_TRIES = 2                                    # primers in a row that brought no answer before priming stops
CACHE_TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}


def create_grace() -> float:
    """AMBIGUOUS_GRACE, or the seconds BATCHRUN_CREATE_GRACE sets (a slow gateway; a quick test)."""
    value = os.environ.get("BATCHRUN_CREATE_GRACE")
    try:
        return max(0.0, float(value)) if value else AMBIGUOUS_GRACE
    except ValueError:
        raise InputError(f"BATCHRUN_CREATE_GRACE: not a number of seconds: {value!r}") from None


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
        self.batches_created = 0
        self._chunk = spec.batch_size
        self._started = time.monotonic()
        self.requests_sent = 0                         # this run's: requests sent (batch members, or messages)
        self._paid_before: Optional[tuple] = None      # (replies paid, cost) when this run began
        self._incomplete_downloads: dict = {}          # batch -> rounds in which its results never came whole
        self._service_errors = ServiceErrors()         # errored results that were the service's (batch mode)
        self._twins: dict = {}                         # job id -> Runner of another job moved forward here
        self._waiting: dict = {}                       # intent -> running batches it waits for (logged once)
        self._job_tag: Optional[str] = None            # the job's tag, once read or made (see _tag)
        create_grace()                                 # a bad BATCHRUN_CREATE_GRACE is refused before anything is sent
        self.ledger = BudgetLedger(spec, self.store, self.job, lambda: self.estimator)   # max_cost (budget.py)

    # ---- the client, created only when needed -----------------------------------------------------
    @property
    def client(self) -> ApiClient:
        if self._client is None:
            a = self._client_args
            key, source, base = resolve_connection(a["api_key"], a["base_url"])
            self._client = ApiClient(api_key=key, key_source=source, base_url=base,
                                     api_version=self.spec.api_version, auth_header=self.spec.auth_header,
                                     extra_headers=self.spec.headers, transport=a["transport"],
                                     retry=a["retry"], sleep=self.sleep)
        return self._client

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
        spec, store, job = self.spec, self.store, self.job
        self.check_connection_settings()
        check_writable(spec.output, spec.partition_by)
        with self.locked():
            self.start()
            backoff = 1.0
            while True:
                self.ledger.new_round()
                if spec.mode == "messages":
                    self.reuse_answers()
                    over = self.ledger.check()
                    changed = False if over else self.messages_step()
                else:
                    self.resolve_intents()
                    changed = self.poll()
                    self._service_errors.check(self.job.short_id)   # stops a run that keeps meeting them
                    self.reuse_answers()
                    over = self.ledger.check()
                    if not over:
                        self.submit()
                counts = store.counts(job.id)
                self._report(counts)
                if not counts.get("pending") and not counts.get("in_flight"):
                    break
                stop = over or self.ledger.held
                if stop and (not counts.get("in_flight") or (over and not wait)):
                    raise BudgetError(self.ledger.stop_message(stop, counts))
                if not wait:
                    return self._result(counts, finished=False, exit_code=ExitCode.IN_PROGRESS)
                self.sleep(min(backoff, spec.poll_interval))
                backoff = 1.0 if changed else min(backoff * 2, spec.poll_interval)
            return self.finish()

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
        result = self._result(counts, finished=True, exit_code=ExitCode.FAILED_ROWS if failed else ExitCode.OK)
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

    def _result(self, counts: dict, *, finished: bool, exit_code: int) -> RunResult:
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
        n = self.store.one(f"SELECT count(*) AS n FROM requests WHERE job_id = ? AND {PAID}", (self.job.id,))["n"]
        return n, self.cost()

    def cost(self) -> Optional[float]:
        return job_cost(self.store, self.job.id)

    def _report(self, counts: dict) -> None:
        if self.on_progress is None:
            return
        b = self.store.one("SELECT count(api_id) AS total, count(*) FILTER (WHERE state IN ('intent','submitted','ended')) "
                           "AS live FROM batches WHERE job_id = ?", (self.job.id,))
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
        return self.store.one("SELECT count(*) AS n FROM jobs WHERE id != ?", (self.job.id,))["n"] == 0

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
        return MessagesDriver(self).run_pending() > 0

    # ---- budget --------------------------------------------------------------------------------
    @property
    def estimator(self):
        if getattr(self, "_estimator", None) is None:
            from .estimator import Estimator
            self._estimator = Estimator(self)
        return self._estimator

    # ---- submit --------------------------------------------------------------------------------
    def submit(self) -> int:
        """Send pending requests in batches. Returns the number of batches created."""
        store, job, spec = self.store, self.job, self.spec
        if store.one("SELECT canceled_at FROM jobs WHERE id = ?", (job.id,))["canceled_at"]:
            self._cancel_pending()  # rows a canceled batch gave back for another attempt are not sent
            return 0
        prime = self._priming()
        if prime == "wait":
            return 0
        created = 0
        tag = self._tag()
        silent = self._silent_twins()
        marks = ",".join("?" * len(silent))
        # not sent: rows another job has answered (reuse_answers takes them next round), and rows in
        # flight in another job, whose answers are coming (unless that job cannot be moved from here)
        filtered = ("AND NOT EXISTS (SELECT 1 FROM requests o WHERE o.params_hash = r.params_hash "
                    "AND o.job_id != r.job_id AND o.reused_from IS NULL AND (o.state IN ('succeeded', 'invalid_output') "
                    f"OR (o.state = 'in_flight' AND o.job_id NOT IN ({marks})) "
                    "OR (o.claimed_at IS NOT NULL AND o.job_id IN ({live}))))")
        if spec.max_cost is not None:   # the figures a reservation needs (count_tokens calls, once) are had
            first = store.conn.execute(   # before the write lock is taken, not while holding it
                "SELECT b.body FROM requests r JOIN bodies b ON b.id = r.body_id WHERE r.job_id = ? "
                "AND r.state = 'pending' LIMIT 1", (job.id,)).fetchone()
            if first is not None:
                self.estimator.request_max(first[0])
        after = -1   # rows are taken in input order; each chunk starts where the last one ended
        while True:
            if prime and after >= 0:
                return created   # a primer goes alone; the rest once it has ended
            # what to send is chosen and its intent committed in one (write-locked) transaction: another
            # job of this state file sharing these requests (even one planned a moment ago) sees them in
            # flight, or has them in flight already and they are not chosen here; never both sent
            with store.transaction(durable=True):
                # (and rows a messages-mode job being run now has claimed: it is sending them)
                live = [] if self._alone() else store.live_others(job.id)
                twins = "" if self._alone() else filtered.replace("{live}", ",".join("?" * len(live)))
                rows = store.conn.execute(
                    f"SELECT r.custom_id, b.body, r.row_index FROM requests r JOIN bodies b ON b.id = r.body_id "
                    f"WHERE r.job_id = ? AND r.state = 'pending' AND r.row_index > ? {twins} "
                    "ORDER BY r.row_index LIMIT ?",
                    (job.id, after, *((*silent, *live) if twins else ()), 1 if prime else self._chunk)).fetchall()
                if not rows:
                    return created
                parts, ids, size = [], [], 16
                prefix = self.prefix
                for cid, body, _ in rows:
                    piece = ('{"custom_id":' + json.dumps(wire_id(tag, cid)) + ',"params":' + full_body(prefix, body)
                             + "}")
                    piece_size = len(piece.encode("utf-8")) + 1
                    if parts and size + piece_size > MAX_BATCH_BYTES:
                        break
                    parts.append(piece)
                    ids.append(cid)
                    size += piece_size
                reserve = None
                if spec.max_cost is not None:   # a batch reserves its maximum cost; cut to the rows that fit
                    fit, reserve = self.ledger.reserve([body for _, body, _ in rows[:len(ids)]], job.short_id)
                    if not fit:
                        return created
                    del parts[fit:], ids[fit:]
                payload = ('{"requests":[' + ",".join(parts) + "]}").encode("utf-8")
                sent_through = rows[len(ids) - 1][2]
                # without twin filtering, the chunk is every pending row in its row range
                span = None if twins else (rows[0][2], sent_through)
                local = self._intent(ids, len(payload), float(reserve) if reserve is not None else None, span, tag)
                if prime:
                    self._primer(local, ids[0])
            failpoints.hit("after_intent")
            try:
                info = self.client.create_batch(payload)
                failpoints.hit("after_create")
            except AmbiguousCreateError as exc:
                # the batch may exist, or appear in the list a little later (a gateway that timed out
                # while the API went on): its rows stay in flight until it is found or the grace is over
                log.warning("job %s: %s; looking for it before sending again", job.short_id, exc)
                self.store.conn.execute("UPDATE batches SET ambiguous_at = ? WHERE id = ?", (now_iso(), local))
                if self.resolve_intent(local):
                    created += 1
                after = sent_through
                continue
            except RequestTooLargeError as exc:
                if len(ids) == 1:   # alone and still too large for this endpoint: it can never be sent
                    self._too_large(local, ids[0], exc)
                    self._chunk = spec.batch_size   # one outsized row does not make every later batch small
                    after = sent_through
                    continue
                self._abandon(local, "413 request_too_large: splitting the batch")
                self._chunk = max(1, len(ids) // 2)
                continue
            except (TransientApiError, GaveUpError) as exc:
                # the client retried for a bounded time and the API still did not take the batch (a
                # full batch queue, an outage): wait while our batches in flight can still end, else stop
                self._abandon(local, f"not created: {exc}")
                if not self._in_flight():
                    raise
                log.warning("job %s: batch not created (%s); trying again after the batches in flight",
                            job.short_id, exc)
                return created
            except NoBatchApiError:
                # certainly not created: the intent is dropped, its rows are as if never sent (the job is
                # not started if nothing else was), and the same job runs on in messages mode
                self.store.drop_intent(local)
                raise
            except ApiError:
                self._abandon(local, "refused by the API")
                raise
            self._submitted(local, info, adopted=0)
            self.requests_sent += len(ids)
            created += 1
            after = sent_through
            log.info("job %s: submitted batch %s (%d requests)", job.short_id, info.get("id"), len(ids))

    # ---- priming the prompt cache ------------------------------------------------------------------
    # The items of one batch run concurrently and do not read each other's cache writes: a batch sent
    # cold writes the cached prefix once per row. So a job whose prefix is cached (primes_cache) first
    # sends one request — its first pending row's own, so nothing is wasted — alone, as a batch like
    # any other (intent, create, adoption of a lost reply), waits for it to end, then sends the rest,
    # which read what it wrote. Rows sent later (retries, the rest of a full queue or a budget, a cron
    # run hours on), when the cache may have lapsed, are primed again: the cache counts as warm for
    # PRIME_LAPSE of its TTL after the intent of the latest batch whose replies wrote or read it.
    def _priming(self) -> Optional[str]:
        """None: send the pending rows now; "wait": a primer is in flight; "prime": send one row alone first."""
        store, job = self.store, self.job
        if not primes_cache(self.spec, job.model):
            return None
        if store.primer_requests(job.id):
            return "wait"
        if store.counts(job.id).get("pending", 0) < PRIME_MIN_ROWS:
            return None
        history = store.cache_history(job.id)
        touched = history["touched_at"]
        if touched and time.time() < parse_iso(touched).timestamp() + PRIME_LAPSE * CACHE_TTL_SECONDS[
                self.spec.cache_ttl]:
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
        self.store.event(self.job.id, "info", f"priming the cache: 1 request ({custom_id}) before the rest")
        log.info("job %s: priming the cache: 1 request (%s) first, the rest once it has ended",
                 self.job.short_id, custom_id)

    def _silent_twins(self) -> list:
        """Other jobs of this state file that have our pending requests in flight but whose answers are
        not coming: their batches cannot be moved from here (their stored job no longer loads).

        Rows in flight in any other job wait for that job's answers (reused when they land) instead of
        being paid twice. A job that a run is moving now answers them; a job nobody runs at the moment (a
        --no-wait run that exited, say) has its batches moved forward here, polled and collected under its
        lock as its own run would. Only a job whose batches cannot be moved from here leaves our rows to
        be sent. (A job that puts our requests in flight after this look is a run moving it now.)
        """
        if self._alone():
            return []
        others = [r[0] for r in self.store.conn.execute(
            "SELECT DISTINCT o.job_id FROM requests r JOIN requests o ON o.params_hash = r.params_hash "
            "AND o.state = 'in_flight' AND o.job_id != r.job_id WHERE r.job_id = ? AND r.state = 'pending'",
            (self.job.id,))]
        return [j for j in others if not self._advance_twin(j)]

    def _advance_twin(self, job_id: str) -> bool:
        """Poll and collect another job's batches (see _silent_twins); False if that cannot be done."""
        lock = JobLock(self.spec.state_path, job_id)
        try:
            lock.acquire(probe=True)
        except LockedError:
            return True   # a run is moving it: its answers are coming
        try:
            twin = self._twins.get(job_id)
            if twin is None:   # one per job for the run: its download rounds are counted as its own run would
                twin = self._twins[job_id] = Runner.for_stored_job(self.spec.state_path, job_id, client=self.client,
                                                                   sleep=self.sleep)
            twin.resolve_intents()
            twin.poll()
            return True
        except InputError as exc:   # its stored job no longer loads here (a models file gone, say)
            log.warning("job %s: cannot move job %s forward (%s): the rows it shares with this job are sent here",
                        self.job.short_id, job_id[:12], exc)
            return False
        finally:
            lock.release()

    def _intent(self, ids: list, nbytes: int, reserve: Optional[float], span: Optional[tuple], tag: str) -> int:
        """Record what is about to be sent, before it is sent: the batch's members, the time and the tag its
        custom_ids carry. Inside the (durable) transaction that chose the members (see submit)."""
        store, job = self.store, self.job
        mark = "UPDATE requests SET state = 'in_flight', batch_id = ?, attempts = attempts + 1, result_type = NULL "
        cur = store.conn.execute("INSERT INTO batches (job_id, state, request_count, body_bytes, intent_at, "
                                 "max_cost, tag) VALUES (?, 'intent', ?, ?, ?, ?, ?)",
                                 (job.id, len(ids), nbytes, now_iso(), reserve, tag))
        local = cur.lastrowid
        if span is not None:
            n = store.conn.execute(mark + "WHERE job_id = ? AND row_index BETWEEN ? AND ? AND state = 'pending'",
                                   (local, job.id, *span)).rowcount
            if n != len(ids):
                raise RuntimeError(f"batch intent marked {n} rows, expected {len(ids)}")  # rolls back
        else:
            store.conn.executemany(mark + "WHERE job_id = ? AND custom_id = ? AND state = 'pending'",
                                   [(local, job.id, cid) for cid in ids])
        return local

    def _tag(self) -> str:
        """This job's tag (see requests.new_job_tag): made once, at its first submit, and kept."""
        if self._job_tag is None:
            with self.store.transaction():
                self.store.conn.execute("UPDATE jobs SET tag = ? WHERE id = ? AND tag IS NULL",
                                        (new_job_tag(), self.job.id))
                self._job_tag = self.store.one("SELECT tag FROM jobs WHERE id = ?", (self.job.id,))["tag"]
        return self._job_tag

    def _submitted(self, local: int, info: dict, *, adopted: int) -> None:
        with self.store.transaction(durable=True):
            self.store.conn.execute(
                "UPDATE batches SET api_id = ?, state = 'submitted', api_status = ?, created_at = ?, "
                "request_counts = ?, adopted = ? WHERE id = ?",
                (info["id"], info.get("processing_status"), info.get("created_at"),
                 json.dumps(info.get("request_counts")), int(adopted), local))
            self.store.conn.execute("UPDATE requests SET api_batch_id = ? WHERE batch_id = ?", (info["id"], local))
        self.batches_created += 1

    def _in_flight(self) -> int:
        return self.store.one("SELECT count(*) AS n FROM batches WHERE job_id = ? AND state IN ('submitted', 'ended')",
                              (self.job.id,))["n"]

    def _too_large(self, local: int, custom_id: str, exc: ApiError) -> None:
        """One request the API refuses as too large even alone: final, errored, never sent again."""
        with self.store.transaction():
            self.store.conn.execute("UPDATE batches SET state = 'abandoned', note = ? WHERE id = ?",
                                    ("413 request_too_large for a single request", local))
            self.store.conn.execute(
                "UPDATE requests SET state = 'errored', result_type = 'errored', error_type = 'request_too_large', "
                "error_message = ?, batch_id = NULL, cost_usd = 0.0, finished_at = ? WHERE job_id = ? AND custom_id = ?",
                (f"the API refused this request as too large even alone ({exc.message})", now_iso(), self.job.id,
                 custom_id))
        log.error("job %s: request %s is too large for the API even alone; it ends errored", self.job.short_id,
                  custom_id)

    def _abandon(self, local: int, note: str, state: str = "abandoned") -> None:
        """The batch of this intent does not exist (or is not ours): its requests are pending again, unpaid."""
        with self.store.transaction():
            self.store.conn.execute("UPDATE batches SET state = ?, note = ? WHERE id = ?", (state, note, local))
            self.store.conn.execute("UPDATE requests SET state = 'pending', batch_id = NULL, api_batch_id = NULL, "
                                    "attempts = max(attempts - 1, 0) WHERE batch_id = ? AND state = 'in_flight'",
                                    (local,))

    # ---- the one ambiguous moment ------------------------------------------------------------------
    def resolve_intents(self) -> None:
        for b in self.store.q("SELECT id FROM batches WHERE job_id = ? AND state = 'intent'", (self.job.id,)):
            self.resolve_intent(b["id"])

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
        or disproved by its results (_proof): every custom_id must be one the intent sent, which carry
        this job's own tag. A candidate still running cannot be proved yet: the intent waits for it to
        end (its rows stay in flight; nothing is sent blindly). Returns whether a batch was adopted.
        """
        store = self.store
        b = store.one("SELECT * FROM batches WHERE id = ?", (local,))
        if not b["ambiguous_at"]:
            b["ambiguous_at"] = now_iso()
            with store.transaction():
                store.conn.execute("UPDATE batches SET ambiguous_at = ? WHERE id = ?", (b["ambiguous_at"], local))
            log.warning("job %s: a run died while creating a batch of %d requests; looking for it before sending "
                        "them again", self.job.short_id, b["request_count"])
        known = {r[0] for r in store.conn.execute("SELECT api_id FROM batches WHERE api_id IS NOT NULL UNION "
                                                  "SELECT api_id FROM foreign_batches WHERE batch_id = ?", (local,))}
        intent = parse_iso(b["intent_at"]).timestamp()
        longest = intent + self.client.retry.max_elapsed + (self.client.http.timeout.read or 600.0)
        sent_by = min(parse_iso(b["ambiguous_at"]).timestamp(), longest) + create_grace()
        candidates = []
        pages = self.client.list_batches()
        try:
            first = next(pages, None)
        except NoBatchApiError as exc:
            if self.client.has_batch_create():
                raise ApiError(f"{self.client.shown_url} creates batches but does not list them ({exc.status}): "
                               "whether the create a run lost made a batch cannot be checked, so its rows are not "
                               "sent again; ask the gateway's operator, or run with `--mode messages`",
                               status=exc.status) from None
            # no batch endpoint at all: the create can have made nothing. The intent is dropped (the job
            # is as if never sent, and may continue in messages mode)
            self.store.drop_intent(local)
            raise
        for item in itertools.chain([first] if first is not None else [], pages):   # newest first; its first
            # page tells the API's clock
            offset = self.client.server_offset
            if offset is None:
                since, until = intent - ADOPT_WINDOW, sent_by + ADOPT_WINDOW
            else:
                since, until = intent + offset - CLOCK_TOLERANCE, sent_by + offset + CLOCK_TOLERANCE
            created = parse_iso(item["created_at"]).timestamp()
            if created < since:
                break
            if created > until or item["id"] in known:
                continue
            if sum((item.get("request_counts") or {}).values()) == b["request_count"]:
                candidates.append(item)
        running, gone, untagged, empty = [], [], [], []
        for item in reversed(candidates):   # the earliest first: the one sent first
            verdict = self._proof(b, item) if item.get("processing_status") == "ended" else None
            if verdict == GONE:   # ours or not, it cannot be told any more
                gone.append(item["id"])
                continue
            if verdict == EMPTY:   # nothing in it to tell whose it is (yet: downloaded again, as collect does)
                empty.append(item["id"])
                continue
            if verdict and b["tag"] is None:   # sent untagged (an older batchrun): its ids prove nothing
                untagged.append(item["id"])
                continue
            if verdict:
                self._submitted(local, item, adopted=PROVEN)
                store.event(self.job.id, "warning", f"adopted batch {item['id']} whose create reply was lost "
                                                    "(its results carry this job's custom_ids)")
                log.warning("job %s: adopted batch %s (its create reply was lost; its results carry this job's "
                            "custom_ids); nothing sent twice", self.job.short_id, item["id"])
                return True
            if verdict is False:
                with store.transaction():
                    store.conn.execute("INSERT OR IGNORE INTO foreign_batches (api_id, batch_id, noted_at) "
                                       "VALUES (?, ?, ?)", (item["id"], local, now_iso()))
                log.info("job %s: batch %s, of the same size, is not the one whose create reply was lost (its "
                         "custom_ids are not the ones sent)", self.job.short_id, item["id"])
            else:
                running.append(item["id"])
        if empty:
            again = self._empty_again(b)
            if again < MISSING_AFTER:
                running += empty   # waited for as a batch whose results cannot be read yet
            else:
                gone += empty      # the same empty file, again and again: it never proves anything
        if running:
            self._wait_note(local, f"create reply was lost: waiting for batch {', '.join(running)} (running, of "
                                   "the same size) to end, when its results tell whether it is this job's")
            if running != self._waiting.get(local):
                self._waiting[local] = running
                log.warning("job %s: batch %s may be the one whose create reply was lost; its rows wait for it to "
                            "end, when its results tell whose it is", self.job.short_id, ", ".join(running))
            return False
        if time.time() < sent_by:
            self._wait_note(local, "create reply was lost: looking for its batch in the API's list until "
                                   f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(sent_by))}")
            return False   # it may still show: looked for again next round, its rows kept in flight
        if gone:   # it may be ours, and paid for: not sent again blindly
            message = (f"the create reply of this request's batch was lost, and batch {', '.join(gone)}, of the same "
                       "size and created then, may be that batch, but its results are gone (deleted, or past the 29 "
                       "days results are kept) or hold no line, so it cannot be proved this job's or not. Not sent "
                       "again, since it "
                       "may have been paid for; `run --resend-lost` sends it again")
            n = self._gone(b, "results_gone", message, "UPDATE batches SET state = 'abandoned', note = ? WHERE id = ?",
                           (f"create reply lost; candidate {', '.join(gone)} has no results any more", local))
            log.error("job %s: %d rows: %s", self.job.short_id, n, message)
            return False
        if untagged:   # the same ids as ours, but an older batchrun sent them without the job's tag
            message = (f"the create reply of this request's batch was lost (sent by an older batchrun, without the "
                       f"job's tag in its custom_ids), and batch {', '.join(untagged)}, of the same size and ids, "
                       "may be that batch or another job's with the same ids: it cannot be proved this job's, so "
                       "its answers are not taken. Not sent again, since it may have been paid for; `run "
                       "--resend-lost` sends it again")
            n = self._gone(b, "batch_unproven", message,
                           "UPDATE batches SET state = 'abandoned', note = ? WHERE id = ?",
                           (f"create reply lost; untagged candidate {', '.join(untagged)} cannot be proved", local))
            log.error("job %s: %d rows: %s", self.job.short_id, n, message)
            return False
        self._abandon(local, "create reply lost and no batch of this job's appeared: requests are pending again")
        log.info("job %s: the lost create made no batch; its requests will be sent again", self.job.short_id)
        return False

    def _wait_note(self, local: int, note: str) -> None:
        """What an unresolved intent waits for, kept on its batch row for `status` to show."""
        with self.store.transaction():
            self.store.conn.execute("UPDATE batches SET note = ? WHERE id = ? AND coalesce(note, '') != ?",
                                    (note, local, note))

    def _empty_again(self, b: dict) -> int:
        """One more whole download of an empty results file for intent or batch `b`: how many so far after the
        first (kept in batches.short_downloads, across runs, as collect counts a file that lacks lines)."""
        with self.store.transaction():
            self.store.conn.execute("UPDATE batches SET short_downloads = short_downloads + 1 WHERE id = ?", (b["id"],))
        return self.store.one("SELECT short_downloads AS n FROM batches WHERE id = ?", (b["id"],))["n"] - 1

    def _proof(self, b: dict, item: dict):
        """Whether an ended batch is the one intent `b` sent: True when every custom_id in its results is
        one the intent sent (with this job's tag), False at the first that is not; None when its results
        could not be read now (asked again next round); GONE when they never can be, EMPTY when the file came
        whole without a line (neither proves anything)."""
        url = item.get("results_url")
        sent = self._sent_ids(b)
        seen = 0
        try:
            if not url:
                url = self.client.retrieve_batch(item["id"]).get("results_url")
                if not url:
                    return None
            with contextlib.closing(self.client.iter_results(url)) as lines:
                for line in lines:
                    if line.get("custom_id") not in sent:
                        return False
                    seen += 1
        except (ResultsGoneError, NotFoundError):
            return GONE
        except (TransientApiError, GaveUpError):
            return None
        return True if seen else EMPTY

    def _sent_ids(self, b: dict) -> set:
        """The custom_ids batch (or intent) `b` sent, as sent: with the tag it carried."""
        return {wire_id(b["tag"], r[0]) for r in
                self.store.conn.execute("SELECT custom_id FROM requests WHERE batch_id = ?", (b["id"],))}

    def _row_ids(self, b: dict) -> Callable[[object], Optional[str]]:
        """From a custom_id in batch `b`'s results to the row's own custom_id (None: not one of this job's)."""
        tag = b["tag"]
        if tag is None:
            return lambda wire: wire
        n = len(tag)
        hashed = {wire_id(tag, r[0]): r[0] for r in self.store.conn.execute(
            "SELECT custom_id FROM requests WHERE batch_id = ? AND length(custom_id) > ?", (b["id"], 64 - n - 1))}

        def row_id(wire):
            if not isinstance(wire, str) or not wire.startswith(tag):
                return None
            if wire[n:n + 1] == "-":
                return wire[n + 1:]
            return hashed.get(wire)
        return row_id

    # ---- poll and collect ----------------------------------------------------------------------
    def poll(self, collect: bool = True) -> bool:
        """Retrieve in-flight batches; collect those that ended (unless `collect` is False: then only
        their status is brought up to date). True if anything changed."""
        changed = False
        for b in self.store.q("SELECT * FROM batches WHERE job_id = ? AND state IN ('submitted', 'ended') "
                              "ORDER BY id", (self.job.id,)):
            if b["state"] == "submitted":
                try:
                    info = self.client.retrieve_batch(b["api_id"])
                except NotFoundError:
                    self._lost(b)
                    changed = True
                    continue
                ended = info.get("processing_status") == "ended"
                with self.store.transaction():
                    self.store.conn.execute(
                        "UPDATE batches SET api_status = ?, request_counts = ?, results_url = ?, ended_at = ?, "
                        "state = ? WHERE id = ?",
                        (info.get("processing_status"), json.dumps(info.get("request_counts")),
                         info.get("results_url"), info.get("ended_at"), "ended" if ended else "submitted", b["id"]))
                if not ended:
                    continue
                if not collect:
                    changed = True
                    continue
                b = self.store.one("SELECT * FROM batches WHERE id = ?", (b["id"],))
            elif not collect:
                continue
            self.collect(b)
            changed = True
        return changed

    def collect(self, b: dict) -> None:
        store, job = self.store, self.job
        if not b["results_url"]:  # ended without a results_url yet: ask again next round
            info = self.client.retrieve_batch(b["api_id"])
            if not info.get("results_url"):
                return
            store.conn.execute("UPDATE batches SET results_url = ? WHERE id = ?", (info["results_url"], b["id"]))
            b = dict(b, results_url=info["results_url"])
        members = store.one("SELECT count(*) AS n FROM requests WHERE batch_id = ?", (b["id"],))["n"]
        if b["adopted"] == ADOPTED and not self._verify_adopted(b):
            return
        # the API's count of the batch's results: a file with fewer lines was cut short
        expected = sum((json.loads(b["request_counts"] or "null") or {}).values()) or members
        missing_sql = "SELECT count(*) AS n FROM requests WHERE batch_id = ? AND state = 'in_flight'"
        # whole downloads in a row that came back the same (as many lines) without the rows still missing:
        # a file cut short at random differs from one download to the next; a line that never arrives does not
        short, last = b["short_downloads"], None
        missing = store.one(missing_sql, (b["id"],))["n"]
        for attempt in range(MAX_DOWNLOADS):
            lines = None
            before = missing   # (counted after the last download: nothing records between)
            try:
                lines = self._download(b)
            except TransientApiError as exc:
                log.warning("job %s: results of %s cut short (%s); downloading again", job.short_id, b["api_id"], exc)
            except ResultsGoneError as exc:
                self._results_gone(b, str(exc))
                return
            missing = store.one(missing_sql, (b["id"],))["n"]
            if missing == 0:
                break
            if lines is not None:   # the file came whole, and some of our rows have no line in it
                if missing < before or (last is not None and lines != last):
                    short = 0
                elif last is not None:
                    short += 1
                last = lines
                store.conn.execute("UPDATE batches SET short_downloads = ? WHERE id = ?", (short, b["id"]))
                if lines >= expected or short >= MISSING_AFTER:
                    self._results_missing(b, short)   # a line that never arrives: not waited for forever
                    return
            log.warning("job %s: results of %s lack %d of %d rows; downloading again", job.short_id,
                        b["api_id"], missing, members)
            self.sleep(0.1 * (attempt + 1))
        else:
            # never whole: the rows without a result were still paid for, so they are not sent again;
            # the batch stays ended and is downloaded again next round (or by the next run)
            failures = self._incomplete_downloads[b["id"]] = self._incomplete_downloads.get(b["id"], 0) + 1
            if failures >= 3:
                raise GaveUpError(
                    f"the results of batch {b['api_id']} could not be downloaded whole ({failures * MAX_DOWNLOADS} "
                    f"tries; {missing} of {members} rows still lack theirs); the results recorded so far are kept")
            return
        self._finalize(b)

    # Each result makes its row final at once — or pending again when it failed in a way worth another
    # attempt (a transient error type, or expired) and attempts remain. Rows of the batch still in flight
    # are the ones whose result has not come back yet. (Final rows keep their batch_id: leaving it out
    # of the SET spares an index update per row.)
    _FIELDS_SQL = "UPDATE requests SET result_type = ?, " + ", ".join(f"{f} = ?" for f in PARSED_FIELDS)
    _WHERE_SQL = " WHERE job_id = ? AND custom_id = ? AND batch_id = ? AND state = 'in_flight'"
    _FINAL = _FIELDS_SQL + ", state = ?, finished_at = ?" + _WHERE_SQL
    _RETRY = (_FIELDS_SQL + ", state = CASE WHEN attempts - free_sends < ? THEN 'pending' ELSE ? END, "
              "batch_id = CASE WHEN attempts - free_sends < ? THEN NULL ELSE batch_id END, finished_at = ?" + _WHERE_SQL)
    _FREE = (_FIELDS_SQL + ", state = 'pending', batch_id = NULL, free_sends = free_sends + 1, finished_at = ?"
             + _WHERE_SQL)

    def _record(self, b: dict, results) -> None:
        """Record (custom_id, fields) pairs of batch `b`, committing every 5000."""
        store, job, max_attempts = self.store, self.job, self.spec.max_attempts
        final: list = []
        retry: list = []
        free: list = []
        now = now_iso()

        def flush() -> None:
            with store.transaction():
                store.conn.executemany(self._FINAL, final)
                store.conn.executemany(self._RETRY, retry)
                store.conn.executemany(self._FREE, free)
            final.clear()
            retry.clear()
            free.clear()

        for custom_id, f in results:
            if custom_id is None:
                continue   # not one of this job's custom_ids
            values = (f["state"], *(f.get(k) for k in PARSED_FIELDS))
            rule = retry_rule(f)
            if rule == FREE:          # the service's error, not the request's: sent again, no attempt used
                free.append((*values, now, job.id, custom_id, b["id"]))
                self._service_errors.meet(f)
            elif rule == ATTEMPT:
                retry.append((*values, max_attempts, f["state"], max_attempts, now, job.id, custom_id, b["id"]))
            else:
                final.append((*values, f["state"], now, job.id, custom_id, b["id"]))
                if f["state"] in ("succeeded", "invalid_output"):
                    self._service_errors.answered += 1
            failpoints.hit("result_line")
            if len(final) + len(retry) + len(free) >= 5000:
                flush()
        if final or retry or free:
            flush()

    def _download(self, b: dict) -> int:
        """Download and record a batch's results; returns the number of result lines (a whole file)."""
        self.store.conn.execute("UPDATE batches SET downloads = downloads + 1 WHERE id = ?", (b["id"],))
        parse = self.parser.parse
        row_id = self._row_ids(b)
        lines = 0

        def results():
            for line in self.client.iter_results(b["results_url"]):
                yield row_id(line.get("custom_id")), parse(line.get("result") or {})

        def counted():
            nonlocal lines
            # downloaded and parsed in a thread, a few hundred lines ahead of the recording
            for item in prefetched(results(), depth=8, chunk=500):
                lines += 1
                yield item

        self._record(b, counted())
        return lines

    def _verify_adopted(self, b: dict) -> bool:
        """A batch adopted before adoption needed proof (by an older batchrun) is proved now, before any
        row takes an answer from it; one that is not the intent's goes back to being looked for."""
        verdict = self._proof(b, {"id": b["api_id"], "results_url": b["results_url"]})
        if verdict == EMPTY:   # downloaded again next round; the same empty file again and again: lines missing
            again = self._empty_again(b)
            if again >= MISSING_AFTER:
                self._results_missing(b, again)
            return False
        if verdict == GONE:   # whoever's it was, its rows cannot be answered from it, nor sent again blindly
            self._results_gone(b, f"the results of batch {b['api_id']}, adopted after a lost create reply, are gone "
                                  "before it could be proved this job's; its rows may have been paid for")
            return False
        if verdict is False:
            with self.store.transaction():
                self.store.conn.execute("INSERT OR IGNORE INTO foreign_batches (api_id, batch_id, noted_at) "
                                        "VALUES (?, ?, ?)", (b["api_id"], b["id"], now_iso()))
                self.store.conn.execute(
                    "UPDATE batches SET state = 'intent', api_id = NULL, adopted = 0, api_status = NULL, "
                    "created_at = NULL, request_counts = NULL, results_url = NULL, ended_at = NULL, note = ? "
                    "WHERE id = ?", (f"adopted {b['api_id']} by mistake: its custom_ids are not this batch's", b["id"]))
                self.store.conn.execute("UPDATE requests SET api_batch_id = NULL WHERE batch_id = ?", (b["id"],))
            log.warning("job %s: batch %s was not ours after all; looking for ours again", self.job.short_id,
                        b["api_id"])
        elif verdict:
            self.store.conn.execute("UPDATE batches SET adopted = ? WHERE id = ?", (PROVEN, b["id"]))
        return bool(verdict)   # None: its results could not be read now; proved next round

    def _lost(self, b: dict) -> None:
        """The API no longer knows this batch (deleted, or the key is another workspace's). It may have
        run and been paid for, so its rows are not sent again unless asked (--resend-lost): they end
        errored, as rows whose results are gone do."""
        message = (f"batch {b['api_id']} is not found at the API (404): deleted, or the API key belongs to another "
                   "workspace. Not sent again, since it may have run and been paid for; `run --resend-lost` "
                   "sends its rows again")
        n = self._gone(b, "batch_not_found", message, "UPDATE batches SET state = 'lost', note = ? WHERE id = ?",
                       ("the API answered 404 for this batch", b["id"]))
        self.store.event(self.job.id, "warning", f"batch {b['api_id']} not found at the API; {n} rows errored")
        log.error("job %s: %s (%d rows)", self.job.short_id, message, n)

    def _results_gone(self, b: dict, message: str) -> None:
        self._gone(b, "results_gone", f"{message}; `run --resend-lost` sends its rows again",
                   "UPDATE batches SET state = 'collected', collected_at = ?, note = ? WHERE id = ?",
                   (now_iso(), "results gone", b["id"]))
        log.error("job %s: %s", self.job.short_id, message)

    def _gone(self, b: dict, error_type: str, message: str, batch_sql: str, batch_args: tuple) -> int:
        """The rows of a batch whose results cannot be had end errored (`error_type`, `message`), final until
        --resend-lost; the batch row is closed with `batch_sql`. Returns the rows so ended."""
        with self.store.transaction():
            n = self.store.conn.execute(
                "UPDATE requests SET state = 'errored', result_type = 'errored', error_type = ?, error_message = ?, "
                "finished_at = ? WHERE batch_id = ? AND state = 'in_flight'",
                (error_type, message, now_iso(), b["id"])).rowcount
            self.store.conn.execute(batch_sql, batch_args)
        return n

    def _results_missing(self, b: dict, again: int) -> None:
        """Rows of an ended batch whose result line never arrives, however often its whole results file is
        downloaded: they end errored `result_missing` (the batch ran, so they may have been paid for: sent
        again only with --resend-lost), and the batch is collected."""
        message = (f"no result came back for this request: the results file of batch {b['api_id']} lacked it, "
                   f"downloaded whole {again + 1} times over; it may have been paid for, so it is not sent again: "
                   "`run --resend-lost` sends it again")
        n = self._gone(b, "result_missing", message,
                       "UPDATE batches SET state = 'collected', collected_at = ?, note = ? WHERE id = ?",
                       (now_iso(), "result lines missing", b["id"]))
        self.store.event(self.job.id, "warning", f"batch {b['api_id']}: {n} result lines never arrived")
        log.error("job %s: %d rows of batch %s never got a result line (the file downloaded whole %d times); they "
                  "end errored result_missing (`run --resend-lost` sends them again)", self.job.short_id, n,
                  b["api_id"], again + 1)

    def _finalize(self, b: dict) -> None:
        """Close the batch once every member has its result."""
        with self.store.transaction():
            self.store.conn.execute("UPDATE batches SET state = 'collected', collected_at = ? WHERE id = ?",
                                    (now_iso(), b["id"]))
        log.info("job %s: collected batch %s", self.job.short_id, b["api_id"])

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
        store, job = self.store, self.job
        if not store.job(job.id):
            raise InputError("this job has not been started in this state file: nothing to cancel")
        with self.locked(refused="another batchrun run holds this job: stop that run (Ctrl-C; the job stays "
                                 "resumable), then cancel again"):
            self.resolve_intents()
            with store.transaction():
                store.conn.execute("UPDATE jobs SET canceled_at = coalesce(canceled_at, ?) WHERE id = ?",
                                   (now_iso(), job.id))
            self._cancel_pending()
            n = 0
            for b in store.q("SELECT * FROM batches WHERE job_id = ? AND state = 'submitted' "
                             "AND coalesce(api_status, '') NOT IN ('canceling', 'ended') ORDER BY id", (job.id,)):
                try:
                    info = self.client.cancel_batch(b["api_id"])
                except (AuthError, TransientApiError, GaveUpError):
                    raise
                except ApiError as exc:  # ended meanwhile, or gone (404): the poll below finds out which
                    log.warning("job %s: could not cancel batch %s: %s", job.short_id, b["api_id"], exc)
                    continue
                with store.transaction():
                    store.conn.execute("UPDATE batches SET api_status = ? WHERE id = ?",
                                       (info.get("processing_status"), b["id"]))
                n += 1
            running = self._settle(wait)
            self._cancel_pending()
            return CancelResult(job_id=job.id, batches_canceled=n, batches_running=running,
                                counts=store.counts(job.id))

    def _settle(self, wait: float) -> int:
        """Poll and collect the job's batches until none is running, for up to `wait` seconds (with
        backoff, capped at poll_interval). Returns how many are still running."""
        deadline = time.monotonic() + wait
        delay = min(0.5, self.spec.poll_interval)
        left = self._in_flight()
        while left and wait > 0:
            self.poll()
            left = self._in_flight()
            if not left or time.monotonic() >= deadline:
                break
            self.sleep(min(delay, deadline - time.monotonic()))
            delay = min(delay * 2, self.spec.poll_interval)
        return left

    def _cancel_pending(self) -> int:
        """Rows of a canceled job that are waiting to be sent (or sent again) end canceled."""
        with self.store.transaction():
            return self.store.conn.execute(
                "UPDATE requests SET state = 'canceled', result_type = 'canceled', error_type = 'canceled', "
                "error_message = CASE WHEN attempts = 0 THEN 'canceled before it was sent' ELSE "
                "'canceled before it was sent again (attempt ' || attempts || ' ended ' || "
                "coalesce(error_type, result_type, 'without a result') || ')' END, cost_usd = 0.0, finished_at = ? "
                "WHERE job_id = ? AND state = 'pending'", (now_iso(), self.job.id)).rowcount
