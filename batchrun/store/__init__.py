"""The SQLite state: the one home of every SQL statement batchrun runs.

`Store` is one state file. Its connection, migrations and transactions are in `core`; the SQL of each
part of the pipeline is a mixin of its own (plan, budget, batches, collect, messages, views), named after the
transitions it makes, so a driver never writes SQL. The file on disk (made private, recognised as
batchrun's, its errors told in one line) and the job locks are in `files`; the schema is `migrations`.
"""
from __future__ import annotations


from ..states import FINAL_STATES, LOST_ERRORS, LOST_ERRORS_SQL
from .batches import Batch, BatchQueries
from .bodies import BodyQueries
from .budget import BudgetQueries
from .collect import CollectQueries
from .core import Reads, StoreCore
from .files import (APPLICATION_ID, BUSY_TIMEOUT, META_TABLE, MIGRATIONS_TABLE, PARSED_FIELDS,
                    RESULT_FIELDS, JobLock, connect_existing, existing_state, now_iso, parse_iso,
                    passive_checkpoint, recognise, state_error, state_errors)
from .messages import MessageQueries
from .migrations import MIGRATIONS, migration
from .plan import JobFigures, PlanQueries
from .views import ViewQueries

__all__ = ["Store", "StoreReader", "Batch", "JobFigures", "StoreCore", "JobLock", "MIGRATIONS", "migration", "APPLICATION_ID", "BUSY_TIMEOUT",
           "META_TABLE", "MIGRATIONS_TABLE", "PARSED_FIELDS", "RESULT_FIELDS", "FINAL_STATES", "LOST_ERRORS",
           "LOST_ERRORS_SQL", "existing_state", "now_iso", "parse_iso", "recognise", "state_error", "state_errors"]


class Store(PlanQueries, BodyQueries, BudgetQueries, BatchQueries, CollectQueries, MessageQueries, ViewQueries,
            StoreCore):
    """One state file. Use as a context manager or call close()."""

    def __enter__(self) -> "Store":
        return self


class StoreReader(ViewQueries, Reads):
    """A connection of its own to a state file that a Store has open, for reads in another thread while the
    Store's connection works (the figures of a run's end are read while its output is written; WAL lets it
    read beside the writer). Use as a context manager."""

    def __init__(self, path: str):
        self.path = path
        with state_errors(path):
            self.conn = connect_existing(path)

    def checkpoint(self) -> None:
        """Copy what the WAL holds into the file now, without waiting for anyone (PASSIVE), so that closing
        the Store has little left to copy; not done (a full disk, say): closing does it, as it always did."""
        passive_checkpoint(self.conn)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "StoreReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
