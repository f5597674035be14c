"""The library API: everything the CLI does, callable from a notebook, a pipeline or an orchestrator.

    import batchrun
    batchrun.validate("jobs/classify-reviews.toml")        # check everything, send nothing
    batchrun.estimate("jobs/classify-reviews.toml")        # what it will cost
    result = batchrun.run("jobs/classify-reviews.toml")    # a job file, a mapping of job keys, or a JobSpec
    batchrun.status("batchrun-state.sqlite")               # every job of a state file (or one job)
    batchrun.cancel("jobs/classify-reviews.toml")

    job = batchrun.Job("jobs/classify-reviews.toml")       # step by step, for Airflow / Dagster tasks
    job.submit()                                            # plan if needed; create what can be created
    job.poll()                                              # True once nothing is in flight
    result = job.collect()                                  # record ended batches; output once all is final

    out = batchrun.run_table(table, prompt="Classify: {{ text }}", labels=["pos", "neg"])  # Arrow/polars/pandas

Every function raises `batchrun.BatchrunError` (its `exit_code` is the CLI's) for what the CLI would
refuse, and never prints: progress goes to `on_progress`, messages to the `batchrun` logger.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

from .api import RetryPolicy
from .errors import InputError
from .runner import CancelResult, Progress, Runner, RunResult, sent_elsewhere
from .spec import JobSpec, merge
from .store import state_errors

JobLike = Union[str, os.PathLike, Mapping[str, Any], JobSpec]


def _one_line(fn: Callable) -> Callable:
    """A damaged state file, a full disk or a disk I/O error met inside `fn` raises its one-line
    BatchrunError (as the CLI prints it), never a bare sqlite3 / OS error."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with state_errors():
            return fn(*args, **kwargs)
    return wrapper


def load_spec(job: JobLike, **overrides: Any) -> JobSpec:
    """A JobSpec from a job file, a mapping of job keys or a JobSpec, with `overrides` (job keys) on top."""
    if isinstance(job, JobSpec):
        if overrides:
            return JobSpec.from_mapping(merge(_fields(job), overrides))
        return job
    if isinstance(job, Mapping):
        return JobSpec.load(None, merge(job, overrides))
    return JobSpec.load(str(job), overrides)


def _fields(spec: JobSpec) -> dict:
    fields = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)
              if f.name not in ("source", "cache_ttl_defaulted")}
    if spec.cache_ttl_defaulted:   # chosen from the mode: chosen again for the overrides
        fields["cache_ttl"] = None
    return fields


def _runner(job: JobLike, *, api_key=None, base_url=None, transport=None, async_transport=None,
            allow_unknown_model: bool = False, on_progress=None, retry: Optional[RetryPolicy] = None,
            **kw: Any) -> Runner:
    runner_kw = {k: kw.pop(k) for k in ("resume_canceled", "resend_lost", "retry_errored", "wait_lock", "sleep")
                 if k in kw}
    spec = load_spec(job, **kw)
    return Runner(spec, api_key=api_key, base_url=base_url, transport=transport, async_transport=async_transport,
                  allow_unknown_model=allow_unknown_model or spec.allow_unknown_model, on_progress=on_progress,
                  retry=retry, **runner_kw)


@_one_line
def run(job: JobLike, *, wait: bool = True, api_key: Optional[str] = None, base_url: Optional[str] = None,
        transport=None, async_transport=None, allow_unknown_model: bool = False,
        on_progress: Optional[Callable[[Progress], None]] = None, retry: Optional[RetryPolicy] = None,
        **overrides: Any) -> RunResult:
    """Run a job to the end (or, with wait=False, as far as it can go now), as `batchrun run` does.

    `overrides` are job keys (max_cost=5, limit=20, ...) and the run options `resume_canceled`,
    `resend_lost`, `retry_errored` (send again the rows that ended errored), `wait_lock`. `retry` bounds
    how long each API call is retried (RetryPolicy).
    Raises BatchrunError."""
    runner = _runner(job, api_key=api_key, base_url=base_url, transport=transport, async_transport=async_transport,
                     allow_unknown_model=allow_unknown_model, on_progress=on_progress, retry=retry, **overrides)
    try:
        return runner.run(wait=wait)
    finally:
        runner.close()


@_one_line
def validate(job: JobLike, *, show: int = 2, allow_unknown_model: bool = False, **overrides: Any) -> dict:
    """Everything `run` checks before sending, sending nothing, as `batchrun validate` does: returns
    {"rows", "job_id", "requests" (the first `show` rendered requests), "warnings"}."""
    from .validation import validate_job
    spec = load_spec(job, **overrides)
    return validate_job(spec, show=show, allow_unknown_model=allow_unknown_model)


@_one_line
def estimate(job: JobLike, *, api_key: Optional[str] = None, base_url: Optional[str] = None, transport=None,
             allow_unknown_model: bool = False, retry: Optional[RetryPolicy] = None, **overrides: Any):
    """What the job's rows still to send will cost (an `Estimate`: counts and a min…max bracket), as
    `batchrun estimate` does. Plans the job in its state file; creates no batch."""
    runner = _runner(job, api_key=api_key, base_url=base_url, transport=transport,
                     allow_unknown_model=allow_unknown_model, retry=retry, **overrides)
    try:
        return runner.estimate()
    finally:
        runner.close()


@_one_line
def cancel(job: JobLike, *, wait: float = Runner.CANCEL_WAIT, state: Optional[str] = None,
           api_key: Optional[str] = None, base_url: Optional[str] = None, transport=None,
           retry: Optional[RetryPolicy] = None, **overrides: Any) -> CancelResult:
    """Cancel a job, as `batchrun cancel` does: its batches in flight are canceled and its rows not yet
    sent end canceled; then, for up to `wait` seconds, the canceled batches are collected.

    `job` is a job (file, mapping, JobSpec), or a job id / id prefix / name of the state file `state`."""
    if isinstance(job, str) and state is not None and not os.path.exists(job) and not job.endswith(".toml"):
        runner = Runner.for_stored_job(state, job, api_key=api_key, base_url=base_url, transport=transport,
                                       retry=retry)
    else:
        if state is not None:
            overrides["state"] = state
        runner = _runner(job, api_key=api_key, base_url=base_url, transport=transport, retry=retry, **overrides)
    try:
        return runner.cancel(wait=wait)
    finally:
        runner.close()


def _is_state_file(path: Union[str, os.PathLike]) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


def _job_status(store, job_id: str, name: Optional[str]) -> dict:
    """A job's status in `store` (see summary.job_status); state "not started" when it has no row there."""
    from .summary import job_status
    row = store.job(job_id)
    if row is None:
        return {"job_id": job_id, "name": name, "state": "not started", "rows": 0, "counts": {},
                "cost_usd": None, "finished": False}
    return job_status(store, row)


@_one_line
def status(job_or_state: JobLike, *, job: Optional[str] = None, base_url: Optional[str] = None,
           **overrides: Any) -> Union[dict, list]:
    """What a state file knows, as `batchrun status --json` prints it.

    Given a state file's path: a list of every job's status (or, with `job=` an id, id prefix or
    name, that job's). Given a job (file, mapping, JobSpec): that job's status in its state file;
    a job not started there has state "not started"."""
    from .summary import find_job, job_status
    from .store import Store
    if isinstance(job_or_state, (str, os.PathLike)) and _is_state_file(job_or_state):
        with Store(str(job_or_state)) as store:
            if job is not None:
                return job_status(store, find_job(store, job))
            return [job_status(store, j) for j in store.find_jobs()]
    if isinstance(job_or_state, (str, os.PathLike)) and not os.path.exists(job_or_state) \
            and not str(job_or_state).endswith(".toml"):
        raise InputError(f"{job_or_state}: no such state file or job file")
    from .api import endpoint_key
    from .runner import Job as PlannedJob, resolve_connection
    spec = load_spec(job_or_state, **overrides)
    if not os.path.exists(spec.state_path):
        raise InputError(f"state file {spec.state_path} does not exist: the job has not been started")
    planned = PlannedJob(spec, allow_unknown_model=True, endpoint=endpoint_key(resolve_connection(None, base_url)[2]))
    try:
        return _job_status(planned.store, planned.id, spec.name)
    finally:
        planned.close()


class Job:
    """One job, moved forward step by step — what an Airflow or Dagster task calls.

        job = batchrun.Job("jobs/label-tickets.toml")   # a job file, a mapping of job keys, or a JobSpec
        job.submit()        # plan if needed; create the batches that can be created; never waits
        job.poll()          # True once nothing is in flight (batches ended or none sent)
        result = job.collect()   # record ended batches, queue retries; output written once all rows are final
        if not result.finished: job.submit() ... (rows to retry are sent by the next submit)

    Every step takes the job's lock for its own duration, commits before it returns, and may run in
    another process than the one before: `job.handle` ({"job_id", "state"}, JSON-serialisable) and
    `Job.from_handle(handle)` carry a job between tasks. In messages mode, `submit` sends every
    pending request (each reply is committed as it comes) and returns once they are answered.
    """

    @_one_line
    def __init__(self, job: JobLike, *, api_key: Optional[str] = None, base_url: Optional[str] = None,
                 transport=None, async_transport=None, allow_unknown_model: bool = False,
                 on_progress: Optional[Callable[[Progress], None]] = None, retry: Optional[RetryPolicy] = None,
                 **overrides: Any):
        self._runner = _runner(job, api_key=api_key, base_url=base_url, transport=transport,
                               async_transport=async_transport, allow_unknown_model=allow_unknown_model,
                               on_progress=on_progress, retry=retry, **overrides)
        self._connection = dict(api_key=api_key, base_url=base_url, transport=transport,
                                async_transport=async_transport, retry=retry)

    # ---- identity -------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self._runner.job.id

    @property
    def spec(self) -> JobSpec:
        return self._runner.spec

    @property
    def handle(self) -> dict:
        """What another process needs to pick this job up again: {"job_id", "state"} (no key, no secret)."""
        return {"job_id": self.id, "state": os.path.abspath(self.spec.state_path)}

    @classmethod
    @_one_line
    def from_handle(cls, handle: Mapping[str, str], **connection: Any) -> "Job":
        """The job of `handle` (see `handle`), rebuilt from the spec stored in its state file. Its input
        must be unchanged (the same job id): otherwise it is another job, and this raises InputError."""
        import json

        from .summary import find_job
        from .store import Store
        state, job_id = handle["state"], handle["job_id"]
        if not os.path.exists(state):
            raise InputError(f"state file {state} does not exist")
        with Store(state) as store:
            row = find_job(store, job_id)
        raw = json.loads(row["spec"])
        raw["state"] = state
        if raw.get("headers"):   # stored by name only (their values may be secrets): give the job itself instead
            raise InputError(f"job {row['id'][:12]} sends extra headers, whose values are not stored: build it "
                             "with batchrun.Job(job file or mapping) instead of from its handle")
        job = cls(JobSpec.from_mapping(raw), **connection)
        if job._runner.identify() != row["id"]:   # (a job planned under the old loopback key: as run settles it)
            job.close()
            elsewhere = sent_elsewhere(row["id"], row["endpoint"], job._runner.job.endpoint)
            if elsewhere:   # the same input, another endpoint: not a changed input
                raise InputError(elsewhere)
            raise InputError(f"job {row['id'][:12]}: its input {raw.get('input')} has changed since it was "
                             "planned; the changed rows are a new job")
        return job

    # ---- the steps --------------------------------------------------------------------------------
    @_one_line
    def submit(self) -> int:
        """Plan the job if it is not planned yet; resolve creates whose reply was lost; create a batch
        for every chunk of rows still to send (within the budget). Never waits. Returns the number of
        batches created (messages mode: of requests answered)."""
        r = self._runner
        r.check_connection_settings()
        with r.locked():
            r.start()
            return r.submit_step()

    @_one_line
    def poll(self) -> bool:
        """Bring the status of the job's batches up to date (nothing is downloaded). True once nothing
        is in flight: every batch sent has ended (or none is out)."""
        r = self._runner
        with r.locked():
            return r.poll_step()

    @_one_line
    def collect(self) -> RunResult:
        """Record the results of every ended batch; rows worth another attempt go back to pending (the
        next `submit` sends them). Once every row is final, the output is written and the result says
        finished (exit_code 0, or 3 when rows failed); before, exit_code is 5 (in progress)."""
        r = self._runner
        with r.locked():
            r.start()
            return r.collect_step()

    @_one_line
    def status(self) -> dict:
        """This job's status, as `batchrun status --json JOB` prints it."""
        return _job_status(self._runner.store, self.id, self.spec.name)

    @_one_line
    def run(self, wait: bool = True) -> RunResult:
        """All the steps in one call, as `batchrun.run` does."""
        return self._runner.run(wait=wait)

    @_one_line
    def estimate(self):
        return self._runner.estimate()

    @_one_line
    def cancel(self, wait: float = Runner.CANCEL_WAIT) -> CancelResult:
        return self._runner.cancel(wait=wait)

    def close(self) -> None:
        self._runner.close()

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"batchrun.Job({self.id[:12]}, state={self.spec.state_path!r})"


# ---- tables in, tables out --------------------------------------------------------------------------
def dataframe_state_path() -> Path:
    """The default state file of run_table / run_dataframe: $XDG_CACHE_HOME/batchrun/dataframe-state.sqlite
    (~/.cache/batchrun/... without XDG_CACHE_HOME), kept between calls and sessions."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "batchrun" / "dataframe-state.sqlite"


def _as_arrow(table):
    """(pyarrow.Table, kind) for a pandas frame, a polars frame, a pyarrow table or record batch reader,
    or anything that exports the Arrow C stream interface (`__arrow_c_stream__`: a DuckDB relation...)."""
    import pyarrow as pa
    kind = type(table).__module__.split(".")[0]
    if isinstance(table, pa.Table):
        return table, "pyarrow"
    if isinstance(table, pa.RecordBatchReader):
        return table.read_all(), "pyarrow"
    if kind == "pandas":
        return pa.Table.from_pandas(table, preserve_index=False), "pandas"
    if kind == "polars":
        return table.to_arrow(), "polars"
    if hasattr(table, "__arrow_c_stream__"):
        return pa.table(table), "pyarrow"
    if hasattr(table, "arrow"):   # older DuckDB relations
        return table.arrow(), "pyarrow"
    raise InputError(f"run_table: a {type(table).__name__} is not a table (give a pyarrow Table, a polars or "
                     "pandas DataFrame, or anything with __arrow_c_stream__)")


@_one_line
def run_table(table, *, prompt: str, state: Optional[str] = None, api_key: Optional[str] = None,
              base_url: Optional[str] = None, transport=None, async_transport=None,
              on_progress: Optional[Callable[[Progress], None]] = None, retry: Optional[RetryPolicy] = None,
              **job: Any):
    """A table in, the same rows and their replies out (the output columns), as the same kind of table:
    a pyarrow Table gives a pyarrow Table, a polars frame a polars frame, a pandas frame a pandas frame
    (with the caller's index); anything else with `__arrow_c_stream__` (a DuckDB relation) gives a
    pyarrow Table. `job` takes any job key (model, max_tokens, labels, output_schema, id_column, ...).

    The job's state is kept in `state`, by default in one file in the user's cache directory (see
    dataframe_state_path), so the same call made again — after an interruption, or in a new session —
    resumes the same job or reuses every answer already paid for, and sends nothing twice. The table
    itself goes through a Parquet file in a temporary directory, removed when the call returns.
    """
    import pyarrow.parquet as pq

    arrow, kind = _as_arrow(table)
    if state is None:
        path = dataframe_state_path()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        state = str(path)
    with tempfile.TemporaryDirectory(prefix="batchrun-") as workdir:
        src = Path(workdir) / "table-input.parquet"
        out = Path(workdir) / "table-output.parquet"
        pq.write_table(arrow, src)
        # the table has no folder: its relative image paths are the caller's
        spec = {"input": str(src), "output": str(out), "prompt": prompt, "state": state, "image_dir": os.getcwd(),
                **job}
        result = run(spec, api_key=api_key, base_url=base_url, transport=transport, async_transport=async_transport,
                     on_progress=on_progress, retry=retry)
        replied = pq.read_table(out)
    info = {"job_id": result.job_id, "cost_usd": result.cost_usd, "counts": result.counts,
            "exit_code": result.exit_code}
    if kind == "pandas":
        frame = replied.to_pandas()
        if not job.get("shard"):   # one output row per input row (the first `limit` ones), in input order
            frame.index = table.index[:len(frame)]
        frame.attrs["batchrun"] = info
        return frame
    if kind == "polars":
        import polars as pl
        return pl.from_arrow(replied)
    return replied.replace_schema_metadata({**(replied.schema.metadata or {}),
                                            b"batchrun.job_id": result.job_id.encode()})


def run_dataframe(df, *, prompt: str, state: Optional[str] = None, api_key: Optional[str] = None,
                  base_url: Optional[str] = None, transport=None, **job: Any):
    """run_table's pandas spelling: a pandas DataFrame in, the same rows (with the same index) and their
    replies out; `frame.attrs["batchrun"]` holds the job id, cost and row counts."""
    return run_table(df, prompt=prompt, state=state, api_key=api_key, base_url=base_url, transport=transport,
                     **job)
