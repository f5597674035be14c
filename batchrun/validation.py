"""`validate`: everything `run` checks before sending, and a look at the first requests.

It plans the job exactly as `run` does — the same code reads, validates and renders every row —
into a throwaway state file, so validate and run can never disagree about what is wrong.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import tempfile

from .spec import JobSpec


def validate_job(spec: JobSpec, *, show: int = 2, allow_unknown_model: bool = False) -> dict:
    """Read the whole input and render every row; return rows, warnings and the first requests."""
    from .job import warnings_for
    from .runner import Runner
    log = logging.getLogger("batchrun")
    level = log.level
    log.setLevel(logging.ERROR)  # the warnings are returned, not logged twice
    try:
        with tempfile.TemporaryDirectory(prefix="batchrun-validate-") as tmp:
            spec = dataclasses.replace(spec, state=os.path.join(tmp, "validate.sqlite"))
            runner = Runner(spec, allow_unknown_model=allow_unknown_model or spec.allow_unknown_model)
            try:
                runner.plan()
                job_id = runner.job.id
                shown = [{"custom_id": cid, "params": params}
                         for _, cid, params in itertools.islice(runner.store.params(job_id), show)]
                return {"rows": runner.store.job(job_id)["rows"], "job_id": job_id, "requests": shown,
                        "warnings": runner.notes + warnings_for(spec, runner.job.model, runner.builder)}
            finally:
                runner.close()
    finally:
        log.setLevel(level)
