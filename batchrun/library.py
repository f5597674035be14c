"""The library API: what the CLI does, callable from a notebook or a pipeline.

    import batchrun
    result = batchrun.run("jobs/classify-reviews.toml")                 # a job file
    result = batchrun.run({"input": "t.csv", "prompt": "…", ...})        # a mapping of job keys
    out_df = batchrun.run_dataframe(df, prompt="Classify: {{ text }}", labels=["pos", "neg"])
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from .api import RetryPolicy
from .runner import Runner, RunResult
from .spec import JobSpec, merge


def load_spec(job: Union[str, os.PathLike, Mapping[str, Any], JobSpec], **overrides: Any) -> JobSpec:
    if isinstance(job, JobSpec):
        if overrides:
            return JobSpec.from_mapping(merge(_fields(job), overrides))
        return job
    if isinstance(job, Mapping):
        return JobSpec.load(None, merge(job, overrides))
    return JobSpec.load(str(job), overrides)


def _fields(spec: JobSpec) -> dict:
    import dataclasses
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "source"}


def run(job: Union[str, os.PathLike, Mapping[str, Any], JobSpec], *, wait: bool = True,
        api_key: Optional[str] = None, base_url: Optional[str] = None, transport=None, async_transport=None,
        allow_unknown_model: bool = False, on_progress=None, retry: Optional[RetryPolicy] = None,
        **overrides: Any) -> RunResult:
    """Run a job to the end (or, with wait=False, as far as it can go now). Raises BatchrunError.

    `retry` bounds how long each API call is retried (RetryPolicy: attempts, longest wait, give-up time).
    """
    spec = load_spec(job, **overrides)
    runner = Runner(spec, api_key=api_key, base_url=base_url, transport=transport, async_transport=async_transport,
                    allow_unknown_model=allow_unknown_model or spec.allow_unknown_model, on_progress=on_progress,
                    retry=retry)
    try:
        return runner.run(wait=wait)
    finally:
        runner.close()


def dataframe_state_path() -> Path:
    """The default state file of run_dataframe: $XDG_CACHE_HOME/batchrun/dataframe-state.sqlite
    (~/.cache/batchrun/... without XDG_CACHE_HOME), kept between calls and sessions."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "batchrun" / "dataframe-state.sqlite"


def run_dataframe(df, *, prompt: str, state: Optional[str] = None, api_key: Optional[str] = None,
                  base_url: Optional[str] = None, transport=None, **job: Any):
    """A pandas DataFrame in, the same rows (with the same index) and their replies out (see the
    output columns).

    The job's state is kept in `state`, by default in one file in the user's cache directory (see
    dataframe_state_path), so the same call made again — after an interruption, or in a new session —
    resumes the same job or reuses every answer already paid for, and sends nothing twice. The frame
    itself goes through a Parquet file in a temporary directory, removed when the call returns.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    if state is None:
        path = dataframe_state_path()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        state = str(path)
    with tempfile.TemporaryDirectory(prefix="batchrun-") as workdir:
        src = Path(workdir) / "dataframe-input.parquet"
        out = Path(workdir) / "dataframe-output.parquet"
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), src)
        spec = {"input": str(src), "output": str(out), "prompt": prompt, "state": state, **job}
        result = run(spec, api_key=api_key, base_url=base_url, transport=transport)
        frame: pd.DataFrame = pq.read_table(out).to_pandas()
    if not job.get("shard"):          # one output row per input row (the first `limit` ones), in input order
        frame.index = df.index[:len(frame)]
    frame.attrs["batchrun"] = {"job_id": result.job_id, "cost_usd": result.cost_usd, "counts": result.counts}
    return frame
