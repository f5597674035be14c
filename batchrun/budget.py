"""The budget ledger: what `max_cost` allows, kept in one place for both modes.

max_cost holds in two steps. (1) Before anything more is sent, in every round of a run, the rows
still to send, priced at the maximum `batchrun estimate` prints for them (cost_usd_max: a budget
read off the estimate passes), must fit in what is left: max_cost minus what was spent (from the
results) minus what the batches in flight may still cost; otherwise nothing more is sent.
(2) Each batch (in messages mode, each request) reserves before it is sent the maximum of its
requests (`Estimator.request_max`: the estimate's own figure for each row, its input tokens
counted or, where the estimate extrapolated them, padded by 10%; every request at its full
max_tokens), so a budget of the estimate's maximum sends every row of it; a batch that does not
fit whole is cut to the rows that do. So what was spent plus the reservations in flight never
passes the budget.
A refusal stops sending, never collecting: batches in flight are still polled and collected
(their reservation then settles to what they cost) and the budget is checked again; the job
stops (BudgetError, exit code 7) only when the rest still does not fit once nothing is in
flight, or, with --no-wait, once what has ended is collected.

The ledger is handed to the drivers; they reserve through it and tell it why they held back
(`hold`), and the run loop asks it whether to stop (`check`, `held`, `stop_message`).
"""
from __future__ import annotations

import logging
from decimal import ROUND_CEILING, Decimal
from typing import Callable, Iterable, Iterator, Optional

from .errors import InputError
from .spec import JobSpec
from .states import IN_FLIGHT, PENDING
from .summary import budget_text, job_cost

log = logging.getLogger("batchrun")


class BudgetLedger:
    def __init__(self, spec: JobSpec, store, job, estimator: Callable[[], object],
                 bodies: Callable[[Iterable[tuple]], Iterator[tuple]]):
        self.spec = spec
        self.store = store
        self.job = job                    # its id may be settled after the ledger is made (a legacy loopback job)
        self._estimator = estimator       # made on first use (counting tokens may call the API)
        self._bodies = bodies             # planned rows -> (row_index, custom_id, row body): Planner.bodies
        self.held: Optional[str] = None   # why a reservation stopped sending this round
        self.unreplied = Decimal(0)       # messages mode: the maximum of each send of this run that may have
                                          # been billed without a reply (spent, as far as the budget knows)
        self._gate: tuple = (None, Decimal(0))   # the pending rows last priced, and their maximum
        self._unreserved_cache: dict = {}        # batch -> (rows in flight, their maximum)
        self._need = Decimal(0)                  # the budget a stop needs to go on

    @property
    def estimator(self):
        return self._estimator()

    @property
    def job_id(self) -> str:
        return self.job.id

    def new_round(self) -> None:
        self.held = None

    def hold(self, cost: Decimal, what: str, *, first: bool = True) -> None:
        """A driver held back a request for want of budget: why, kept for the run's stop (`first`: unless
        another reason was kept already this round)."""
        if not (first and self.held):
            self.held = self.over(cost, what)

    def spent_without_reply(self, cost: Decimal) -> None:
        """Messages mode: a send that may have been billed with no reply saying what it cost keeps its
        reservation (`cost`, its maximum) as spent."""
        self.unreplied += cost

    def left(self) -> tuple[Decimal, Decimal, Decimal]:
        """(left, spent, reserved): max_cost minus what was spent and what batches in flight may still cost.

        Spent: what the results cost, and (messages mode) the maximum of each send of this run that may
        have been billed without a reply (`unreplied`)."""
        reserved = Decimal(0)
        for batch, max_cost in self.store.reservations(self.job_id):
            reserved += Decimal(str(max_cost)) if max_cost is not None else self._unreserved(batch)
        spent = Decimal(str(job_cost(self.store, self.job_id) or 0.0)) + self.unreplied
        return Decimal(str(self.spec.max_cost)) - spent - reserved, spent, reserved

    def _unreserved(self, local: int) -> Decimal:
        """A batch sent before the job had a budget reserved nothing: its rows in flight at their maximum."""
        known = self._unreserved_cache
        n = self.store.rows_in_flight(local)
        if local not in known or known[local][0] != n:
            rows = self._bodies(self.store.planned_rows(batch=local, state=IN_FLIGHT))
            known[local] = (n, sum((self.estimator.request_max(body) for _, _, body in rows), Decimal(0)))
        return known[local][1]

    def check(self) -> Optional[str]:
        """Why nothing more may be sent now; None when the rows still to send fit what is left of the budget."""
        if self.spec.max_cost is None:
            return None
        key = self.store.pending_key(self.job_id)
        if not key[0]:
            return None
        if self._gate[0] != key:   # the same rows are not estimated twice
            est = self.estimator.estimate()
            if est.cost_usd_max is None:
                raise InputError(f"max_cost: {self.spec.model} has no prices in the model catalog, so a budget "
                                 "cannot be enforced; add its prices with --models FILE")
            self._gate = (key, Decimal(str(est.cost_usd_max)))
        return self.over(self._gate[1], f"the {key[0]} rows still to send (at the maximum "
                                        "`batchrun estimate` gives)")

    def over(self, cost: Decimal, what: str) -> Optional[str]:
        """Why `cost` does not fit what is left of the budget (None when it does)."""
        left, spent, reserved = self.left()
        if cost <= left:
            return None
        self._need = spent + reserved + cost
        in_flight = f", ${reserved:.6f} reserved by batches in flight" if reserved else ""
        return (f"max_cost: {what} may cost up to ${cost:.6f}, but only ${max(left, Decimal(0)):.6f} of the "
                f"{budget_text(self.spec.max_cost)} budget is left (spent ${spent:.6f}{in_flight})")

    def reserve(self, bodies: list, short_id: str) -> tuple[int, Decimal]:
        """How many of these requests, from the first, fit in what is left of the budget, and their reservation."""
        left = self.left()[0]
        total = Decimal(0)
        for n, body in enumerate(bodies):
            cost = self.estimator.request_max(body)
            if total + cost > left:
                if n == 0:
                    self.held = self.over(cost, "the next request (reserved at its maximum before it is sent)")
                else:
                    log.info("job %s: budget: sending %d of %d requests now, the rest once what is in flight has "
                             "cost what it costs", short_id, n, len(bodies))
                return n, total
            total += cost
        return len(bodies), total

    def stop_message(self, why: str, counts: dict) -> str:
        """The line a budget stop ends with: why, what was spent, and how to continue."""
        need = self._need.quantize(Decimal("0.0001"), rounding=ROUND_CEILING)
        paid = self.store.paid_rows(self.job_id)
        flying = counts.get(IN_FLIGHT, 0)
        sent = (f"{flying} rows still in flight: the next run collects them" if flying
                else "nothing is in flight")
        return (f"{why}; {paid} rows paid so far, {counts.get(PENDING, 0)} not sent, {sent}. To continue, run "
                f"again with --max-cost {need} or more")

    def record_max_cost(self) -> None:
        """The stored spec keeps the budget of the job's latest run: status and report show that one."""
        self.store.record_max_cost(self.job_id, self.spec.max_cost)
