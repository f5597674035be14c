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
        allow_unknown_model: bool = False, on_progress=None, **overrides: Any) -> RunResult:
    """Run a job to the end (or, with wait=False, as far as it can go now). Raises BatchrunError."""
    spec = load_spec(job, **overrides)
    runner = Runner(spec, api_key=api_key, base_url=base_url, transport=transport, async_transport=async_transport,
                    allow_unknown_model=allow_unknown_model or spec.allow_unknown_model, on_progress=on_progress)
    try:
        return runner.run(wait=wait)
    finally:
        runner.close()


def run_dataframe(df, *, prompt: str, state: Optional[str] = None, api_key: Optional[str] = None,
                  base_url: Optional[str] = None, transport=None, **job: Any):
    """A pandas DataFrame in, the same rows with their replies out (see the output columns).

    The frame is written to a Parquet file under a work directory (the state file's directory, or a
    temporary one), so a call that is interrupted and made again resumes the same job.
    """
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    workdir = Path(state).parent if state else Path(tempfile.mkdtemp(prefix="batchrun-"))
    workdir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    src = workdir / "dataframe-input.parquet"
    pq.write_table(table, src)
    out = workdir / "dataframe-output.parquet"
    spec = {"input": str(src), "output": str(out), "prompt": prompt,
            "state": state or str(workdir / "batchrun-state.sqlite"), **job}
    result = run(spec, api_key=api_key, base_url=base_url, transport=transport)
    frame: pd.DataFrame = pq.read_table(out).to_pandas()
    frame.attrs["batchrun"] = {"job_id": result.job_id, "cost_usd": result.cost_usd, "counts": result.counts}
    return frame
