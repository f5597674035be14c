"""Row and batch states: defined here once, imported everywhere (the store's SQL included).

A row (a request of a job) is `pending` until it is sent, `in_flight` while a batch or a message carries
it, and then final: one of FINAL_STATES. A batch row (the local record of one Message Batch) starts as an
`intent` (committed before the create is sent), is `submitted` once the API named it, `ended` when the API
says so, and `collected` once every member has its result; or `abandoned` (its create made no batch),
`lost` (the API no longer knows it) or `foreign` (a candidate proved not ours).
"""
from __future__ import annotations

# rows
PENDING = "pending"
IN_FLIGHT = "in_flight"
SUCCEEDED = "succeeded"
ERRORED = "errored"
EXPIRED = "expired"
CANCELED = "canceled"
INVALID_OUTPUT = "invalid_output"     # answered, but the reply did not fit the job's output schema
FINAL_STATES = (SUCCEEDED, ERRORED, EXPIRED, CANCELED, INVALID_OUTPUT)
ROW_STATES = (PENDING, IN_FLIGHT, *FINAL_STATES)   # every state of a row, in the order status shows them
ANSWERED = (SUCCEEDED, INVALID_OUTPUT)   # a reply came and was paid for: reusable by another job
# error types of rows that ended errored without their result (batch 404, results gone, a result line that never
# came, a lost create's candidate that cannot be proved the job's): they may have been paid for, so they are
# sent again only with --resend-lost
LOST_ERRORS = ("batch_not_found", "results_gone", "result_missing", "batch_unproven")
LOST_ERRORS_SQL = "(" + ", ".join(f"'{e}'" for e in LOST_ERRORS) + ")"

# batches
INTENT = "intent"
SUBMITTED = "submitted"
ENDED = "ended"
COLLECTED = "collected"
ABANDONED = "abandoned"
LOST = "lost"
FOREIGN = "foreign"
LIVE_BATCHES = (INTENT, SUBMITTED, ENDED)   # a batch that may still cost something


def sql_list(values) -> str:
    """`('a', 'b')` for an SQL IN: states are constants of this module, never user input."""
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"
