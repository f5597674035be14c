"""The SQL of polling and collecting: batches that ended, results recorded, rows lost or missing."""
from __future__ import annotations


class CollectQueries:
    pass
