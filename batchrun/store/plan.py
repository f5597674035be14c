"""The SQL of planning: the job's requests stored, answers reused, the run's options (resend, retry, resume)."""
from __future__ import annotations


class PlanQueries:
    pass
