"""The SQL of what status, report, the summary, the budget and the output read."""
from __future__ import annotations


class ViewQueries:
    pass
