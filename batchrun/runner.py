"""The run: a short loop over the drivers that move a job forward, plan → submit → poll → collect → write.

Each step is idempotent and committed to the state file before the next one starts, so `run` can
be killed at any moment and called again (from cron, say) to pick up exactly where it stopped. Each
is a driver's, handed what it needs (the store, the job, the client, the parser, the budget ledger):

* plan     — planner.py: read the input once, render every row, store each request (custom_id, hash,
             figures; not its body, rendered again when sent: bodies.py) in one transaction; take
             answers another job already paid for; the run's options.
* submit   — batches.py: for each chunk of pending requests, choose them and commit an *intent* in one
             transaction, POST the batch, commit its id (and prime the prompt cache first). adoption.py:
             a create whose reply is lost, or that a killed run left under way, is resolved through the
             list endpoint (its batch adopted once its results prove it this job's), never by sending
             again blindly.
* poll, collect, retry — collector.py: retrieve in-flight batches until they end, stream their results
             line by line and record them; failed rows worth another attempt go back to pending.
* messages mode — messages.py: every pending row over POST /v1/messages, each reply committed at once.
* write    — planner.py: stream the input again, join each record batch to its results, write atomically.

A round of `run` is `step`; the library's step-by-step Job calls `submit_step`, `poll_step` and
`collect_step`, each one round under the job's lock.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

from .api import ApiClient, AsyncClient, LEGACY_LOOPBACK, endpoint_key, is_anthropic_api, is_loopback_endpoint
from .adoption import Adoption
from .batches import BatchDriver
from .collector import Collector, ServiceErrors
from .context import BatchContext, RunCounters
from .errors import BudgetError, ExitCode, InputError, LockedError, NotFoundError
from .models import Catalog
from .output import check_writable
from .requests import RequestBuilder, output_schema_for
from .results import ResultParser
from .spec import JobSpec, check_api_version
from .states import FINAL_STATES, IN_FLIGHT, PENDING, SUCCEEDED
from .budget import BudgetLedger
from .job import Job, resolve_connection, sent_elsewhere
from .planner import Planner
from .prefetch import Ahead
from .summary import find_job, job_cost, job_figures
from .store import JobLock, Store, StoreReader, existing_state

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
        return self.done - self.counts.get(SUCCEEDED, 0)


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
    # the figures of the job's rows when the run ended (Store.figures, with the model's price tiers): the
    # summary shows them without reading them again
    figures: Optional[dict] = field(default=None, repr=False, compare=False)

    @property
    def failed(self) -> int:
        return sum(n for s, n in self.counts.items() if s not in (SUCCEEDED, PENDING, IN_FLIGHT))


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
        self._estimator = None                         # see estimator
        self.ledger = BudgetLedger(spec, self.store, self.job, lambda: self.estimator,   # max_cost (budget.py)
                                   bodies=lambda rows: self.planner.bodies(rows))
        self.planner = Planner(spec, self.job, self.store, self.parser, self.ledger, self._note)
        # the drivers (batch mode's batches.py, adoption.py, collector.py; messages.py), handed what they need
        self.counters = RunCounters()                  # this run's batches created and requests sent
        self.service_errors = ServiceErrors()          # errored results that were the service's (batch mode)
        self.context = ctx = BatchContext(spec=spec, store=self.store, job=self.job, client=lambda: self.client,
                                          parser=self.parser, ledger=self.ledger, bodies=self.planner.bodies,
                                          full_body=self.full_body, sleep=sleep, counters=self.counters)
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
        self.planner.close()
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
                if not counts.get(PENDING) and not counts.get(IN_FLIGHT):
                    break
                self.stop_over_budget(step, wait)
                if not wait:
                    return self.result(counts, finished=False, exit_code=ExitCode.IN_PROGRESS)
                if spec.mode == "messages" or not step.sent:
                    # (a round that made batches polls them at once: a batch can end within seconds)
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
            pending = 0 if over else self.store.counts(self.job.id).get(PENDING, 0)
            changed = False if over else self.messages_step()
            counts = self.store.counts(self.job.id)
            return Step(changed, over, counts, 0 if over else pending - counts.get(PENDING, 0))
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
        if stop and (counts.get(PENDING) or counts.get(IN_FLIGHT)) and \
                (not counts.get(IN_FLIGHT) or (step.over and not wait)):
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
        if counts.get(PENDING) or counts.get(IN_FLIGHT):
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
        new = self.store.job(self.job.id) is None   # planned by this run: nothing of it is paid for yet
        self.plan()
        self.planner.apply_options(resume_canceled=self.resume_canceled, resend_lost=self.resend_lost,
                                   retry_errored=self.retry_errored)
        self.ledger.record_max_cost()
        self._paid_before = (0, 0.0) if new else self._paid()

    def finish(self) -> RunResult:
        """Every row is final: write the output, mark the job finished, and say how it ended."""
        # the figures the run ends with, read on a connection of their own while the output is written (the
        # rows are final; SQLite reads without the GIL), the WAL copied into the file there too (see StoreReader)
        aside = Ahead(self._figures_aside)
        try:
            rows = self.write_output()
        finally:
            aside.wait()
        self.store.mark_written(self.job.id)
        figures = aside.result()
        counts = figures["counts"]
        failed = sum(n for s, n in counts.items() if s != SUCCEEDED)
        result = self.result(counts, finished=True, exit_code=ExitCode.FAILED_ROWS if failed else ExitCode.OK,
                             figures=figures)
        result.rows = rows
        return result

    def estimate(self):
        """Plan the job (locally) and estimate what is still to be paid; sends no batch."""
        self.check_connection_settings()
        with self.locked():
            self.plan()
            return self.estimator.estimate(spent_usd=self.cost())

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
        latest = self.store.latest_api_id(legacy)
        if latest is None:
            return False
        try:
            batch = self.client.retrieve_batch(latest)
        except NotFoundError:
            return False
        if not isinstance(batch, dict) or batch.get("id") != latest:   # a reply, but not about that batch
            return False
        self.store.move_job(legacy, self.job.endpoint)
        return True

    def result(self, counts: dict, *, finished: bool, exit_code: int, figures: Optional[dict] = None) -> RunResult:
        """How the run stands: its counts, its cost, what it sent and paid (exit_code as the CLI ends), and the
        figures of the job's rows (`figures`, read here if not given: the job's cost, what it paid)."""
        figures = figures or self.figures()
        replies, cost = figures["paid"], figures["cost"]
        if self.parser.unpriced or (self.job.model is not None and self.job.model.prices is None):
            self._note(f"cost unknown: {self.spec.model} has no prices in the model catalog (cost_usd is null)")
        if self.parser.unreadable_usage:
            self._note(f"{self.parser.unreadable_usage} replies of this run reported usage that cannot be right "
                       "(counts that are not whole non-negative numbers): recorded as missing, priced at $0")
        before_n, before_cost = self._paid_before or (replies, cost)
        run_cost = None if cost is None or before_cost is None else round(cost - before_cost, 10)
        return RunResult(job_id=self.job.id, finished=finished, counts=counts, cost_usd=cost,
                         output=self.spec.output if finished else None, exit_code=exit_code,
                         batches_created=self.batches_created, notes=list(self.notes), sent=self.requests_sent,
                         replies=replies - before_n, run_cost_usd=run_cost, figures=figures)

    def figures(self) -> dict:
        """The figures of the job's rows now, with the model's price tiers (see summary.job_figures): one scan."""
        return job_figures(self.store, self.job.id, self.job.catalog, self.spec.model)

    def _figures_aside(self) -> dict:
        with StoreReader(self.store.path) as reader:
            figures = job_figures(reader, self.job.id, self.job.catalog, self.spec.model)
            reader.checkpoint()
        return figures

    def _paid(self) -> tuple[int, Optional[float]]:
        """(replies the job paid for, what they cost) now: a run's own share is the change over the run."""
        return self.store.paid(self.job.id)

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

    # ---- planning, answers reused, the run's options, the output: the planner (planner.py) -----------
    @property
    def builder(self) -> Optional[RequestBuilder]:
        """The job's request builder, once planned (the planner's; None before)."""
        return self.planner.builder

    def full_body(self, row_body: str) -> str:
        """The full params JSON of a planned request."""
        return self.planner.full_body(row_body)

    def bodies(self, rows: Iterable[tuple]) -> Iterator[tuple[int, str, str]]:
        """(row_index, custom_id, row body) of planned rows (see Planner.bodies)."""
        return self.planner.bodies(rows)

    def plan(self) -> None:
        self.planner.plan()

    def reuse_answers(self) -> int:
        return self.planner.reuse_answers()

    def write_output(self) -> int:
        return self.planner.write_output()

    def _note(self, note: str) -> None:
        """A note for the run's result, said (logged) once."""
        if note not in self.notes:
            self.notes.append(note)
            log.warning("%s", note)

    # ---- messages mode ---------------------------------------------------------------------------
    def messages_step(self) -> bool:
        """Messages mode: send every pending row over POST /v1/messages, each reply committed at once."""
        from .messages import MessagesDriver
        transport = self._client_args["async_transport"]
        if transport is None and self._client_args["transport"] is not None:
            raise InputError("messages mode sends with an async client: give it an httpx.AsyncBaseTransport "
                             "(such as httpx.ASGITransport) as async_transport, not a sync transport")
        client = AsyncClient(**self._connection(), transport=transport, connections=self.spec.concurrency)
        return MessagesDriver(self.context, client, self._report).run_pending() > 0

    # ---- budget --------------------------------------------------------------------------------
    @property
    def estimator(self):
        """The job's estimator (made on first use: counting tokens may call the API), handed the store's
        figures of the job, its model and catalog, and the client's count_tokens."""
        if self._estimator is None:
            from .estimator import Estimator
            self._estimator = Estimator(
                self.spec, self.job.catalog, self.job.model,
                count_tokens=lambda params, retry: self.client.count_tokens(params, retry=retry),
                figures=self.planner.figures, sample=lambda: self.planner.sample(2000),
                prefix=lambda: self.planner.prefix, at_anthropic=is_anthropic_api(self.job.endpoint))
        return self._estimator

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
