"""batchrun: run LLM jobs over tables through Anthropic's Message Batches API."""
__version__ = "0.1.0"

__all__ = ["run", "run_dataframe", "JobSpec", "RunResult", "BatchrunError"]


def __getattr__(name):  # keep `import batchrun` light: load the pipeline on first use
    if name in ("run", "run_dataframe"):
        from . import library
        return getattr(library, name)
    if name == "JobSpec":
        from .spec import JobSpec
        return JobSpec
    if name == "RunResult":
        from .runner import RunResult
        return RunResult
    if name == "BatchrunError":
        from .errors import BatchrunError
        return BatchrunError
    raise AttributeError(name)
