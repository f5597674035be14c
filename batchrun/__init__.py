"""batchrun: run LLM jobs over tables through Anthropic's Message Batches API.

The library does all the CLI does (see batchrun.library):

    import batchrun
    batchrun.validate(job); batchrun.estimate(job); batchrun.run(job)
    batchrun.status(job_or_state_path); batchrun.cancel(job)
    j = batchrun.Job(job); j.submit(); j.poll(); j.collect()
    out = batchrun.run_table(table, prompt=..., model=..., max_tokens=...)
"""
__version__ = "0.1.0"

_LIBRARY = ("run", "validate", "estimate", "status", "cancel", "Job", "run_table", "run_dataframe", "load_spec")

__all__ = [*_LIBRARY, "JobSpec", "RunResult", "CancelResult", "Progress", "RetryPolicy", "BatchrunError"]


def __getattr__(name):  # keep `import batchrun` light: load the pipeline on first use
    if name in _LIBRARY:
        from . import library
        return getattr(library, name)
    if name == "JobSpec":
        from .spec import JobSpec
        return JobSpec
    if name in ("RunResult", "CancelResult", "Progress"):
        from . import runner
        return getattr(runner, name)
    if name == "RetryPolicy":
        from .api import RetryPolicy
        return RetryPolicy
    if name == "BatchrunError":
        from .errors import BatchrunError
        return BatchrunError
    raise AttributeError(name)
