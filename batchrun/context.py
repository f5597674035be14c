"""What the drivers (batch mode's batches.py, adoption.py, collector.py; messages mode's messages.py) are handed
by the run that uses them: the job, its state file, the API client, the result parser, the budget ledger and
the run's counters."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

if TYPE_CHECKING:   # (not imported at run time: the context is a plain record)
    from .api import Client
    from .budget import BudgetLedger
    from .results import ResultParser
    from .spec import JobSpec
    from .store import Store

ADOPTED, PROVEN = 1, 2    # batches.adopted: found after a lost create; and proved ours by its results before
                          # it was adopted
MISSING_AFTER = 3         # whole downloads again that bring the same file without some rows' lines: those
                          # rows end `result_missing` (and a lost create's candidate whose file stays empty
                          # proves nothing)


@dataclass
class RunCounters:
    """What this run did, for its RunResult."""
    batches_created: int = 0   # batches it created (or adopted after a lost create reply)
    requests_sent: int = 0     # requests it sent (in batches it created, or over messages)


@dataclass
class BatchContext:
    """The job the drivers move and what they move it with. `job` is the run's job identity (its `id` is
    read at each use: a job planned under an old key is settled before its lock); `client` makes the API
    client on first use (a job with nothing to send or poll needs no key)."""
    spec: "JobSpec"
    store: "Store"
    job: Any                                  # the run's Job: id, short_id, model
    client: Callable[[], "Client"]
    parser: "ResultParser"
    ledger: "BudgetLedger"
    bodies: Callable[[Iterable[tuple]], Iterator[tuple[int, str, str]]]   # planned rows -> (row_index,
                                              # custom_id, row body): Planner.bodies (see bodies.py)
    full_body: Callable[[str], str]           # a row body -> the full params JSON sent
    sleep: Callable[[float], None]
    counters: RunCounters = field(default_factory=RunCounters)

    @property
    def job_id(self) -> str:
        return self.job.id

    @property
    def short_id(self) -> str:
        return self.job.short_id
