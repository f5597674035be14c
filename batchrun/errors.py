"""The project's own exceptions, each mapped to one exit code at the CLI boundary.

A user's mistake is a `BatchrunError` subclass with a one-line message that names the problem
(file, column, row, key); the CLI prints that line and exits with the error's code — never a
traceback.
"""
from __future__ import annotations

from typing import Optional


class ExitCode:
    """Exit codes of `batchrun` (documented in the README and `batchrun --help`)."""

    OK = 0             # every row succeeded (or nothing to do)
    INTERNAL = 1       # a bug in batchrun: please report it
    BAD_INPUT = 2      # the job, its input or the flags are wrong: nothing was sent (or, the input changed
                       # while its job ran: nothing was written)
    FAILED_ROWS = 3    # the job finished, but some rows ended errored/expired/canceled/invalid_output
    API_ERROR = 4      # the API refused us (authentication, a gateway's error), stayed unreachable or overloaded
                       # (rows stay pending), or the disk is full (NoSpaceError); the job stays resumable
    IN_PROGRESS = 5    # --no-wait: batches are still running; run again later
    LOCKED = 6         # another run holds this job
    BUDGET = 7         # the budget (--max-cost) stops the job
    INTERRUPTED = 130  # Ctrl-C / SIGTERM; the job is resumable


class BatchrunError(Exception):
    """Base of every error batchrun reports to a user as one line."""

    exit_code = ExitCode.INTERNAL

    def __init__(self, message: str):
        message = redact(message)
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:  # one line, always
        return " ".join(self.message.split("\n"))


# ---- secrets ----------------------------------------------------------------------------------
# The API key never appears in what batchrun prints, logs or stores: the client registers it here, and
# every BatchrunError message, CLI error line, log line and debug traceback goes through `redact`.
_SECRETS: set[str] = set()


def register_secret(value: Optional[str]) -> None:
    """Remember a secret (and the forms a message might quote it in) so `redact` hides it.

    Keys that look like Anthropic's ("sk-…") always count; other values only from 16 characters on,
    so that a stand-in like ANTHROPIC_API_KEY=emulator does not blank that word out of every message.
    """
    if not value:
        return
    for form in (value, value.strip(), repr(value)[1:-1], repr(value.encode("utf-8", "replace"))[2:-1]):
        form = form.strip()
        if len(form) >= 16 or (form.startswith("sk-") and len(form) >= 6):
            _SECRETS.add(form)


def redact(text: str) -> str:
    """`text` with every registered secret replaced by a mask ("sk-ant-…")."""
    for secret in sorted(_SECRETS, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "sk-ant-…" if secret.startswith("sk-ant-") else "…")
    return text


class InputError(BatchrunError):
    """Bad job spec, flags or input data. Raised before anything is sent."""

    exit_code = ExitCode.BAD_INPUT


class SpecError(InputError):
    """The job file or a flag is malformed."""


class StateFileError(InputError):
    """The state file cannot be used: not batchrun's, a symbolic link, damaged, or written by a newer
    batchrun. Nothing in it (nor anything it points to) was changed."""


class DiskError(BatchrunError):
    """The machine failed a read or write of the state file (an I/O error): the steps committed before it
    are kept, and the job resumes once the disk is sound."""

    exit_code = ExitCode.API_ERROR


class NoSpaceError(DiskError):
    """The disk filled up while writing the state file, a lock or the output. Every committed step is
    kept (a write that did not fit was rolled back whole): the same command resumes once there is room."""

    def __init__(self, path: str):
        super().__init__(f"no space left on {path}; nothing was lost, run again once there is room")
        self.path = path


class BudgetError(BatchrunError):
    exit_code = ExitCode.BUDGET


class LockedError(BatchrunError):
    exit_code = ExitCode.LOCKED


class ApiError(BatchrunError):
    """An error reply from the API (or a gateway)."""

    exit_code = ExitCode.API_ERROR

    def __init__(self, message: str, *, status: int | None = None, error_type: str | None = None,
                 request_id: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.request_id = request_id
        self.retry_after = retry_after


class AuthError(ApiError):
    """401/403: no retry can fix it."""


class NotFoundError(ApiError):
    pass


class ResultsGoneError(ApiError):
    """A batch's results are no longer available (archived after 29 days)."""


class TransientApiError(ApiError):
    """Retryable: connection problems, timeouts, 408/409/429/5xx."""


# What a failed exchange says about the request, decided once (api.transport_error, from httpx's exception):
# nothing of it was delivered (NotSentError), or it was sent and no reply came (NoReplyError).
class NotSentError(ApiError):
    """Nothing of the request was delivered (our own client refused to send it, or no connection was made):
    it cannot have been run or paid for."""


class UnreachableError(TransientApiError, NotSentError):
    """No connection was made (refused, DNS, TLS, connect timeout): nothing was delivered, so nothing
    can have been run or paid for."""


class NoReplyError(TransientApiError):
    """Sent, and no (whole) reply came (a timeout, a connection dropped after sending): the request may
    have run and been paid for."""


# ---- what an error says about the request that met it: ONE rule, both modes -------------------
# An error ends a row only when it is about the request itself (it would fail again, whatever the
# service's state). Every other error is the service's (or the account's, or a gateway's): the row is
# sent again later, by this run or the next, and never ends for it.
ABOUT_REQUEST = "request"   # invalid_request_error, 413 request_too_large: the row ends errored
SLOW_DOWN = "slow_down"     # 429 / 529, rate_limit_error, overloaded_error: wait and send again
ACCOUNT = "account"         # 401 / 402 / 403, authentication, billing, permission: stop the run at once
SERVICE = "service"         # anything else (5xx, api_error, a gateway's own types): send again later

REQUEST_ERROR_TYPES = frozenset({"invalid_request_error", "request_too_large"})
SLOW_DOWN_TYPES = frozenset({"rate_limit_error", "overloaded_error"})
ACCOUNT_ERROR_TYPES = frozenset({"authentication_error", "permission_error", "billing_error"})


def error_class(error_type: Optional[str], status: Optional[int] = None) -> str:
    """Which of ABOUT_REQUEST, SLOW_DOWN, ACCOUNT, SERVICE an error is, from its type (a reply's
    `error.type`, or an errored batch result's) and, for a reply, its HTTP status."""
    if status in (429, 529) or error_type in SLOW_DOWN_TYPES:
        return SLOW_DOWN
    if status in (401, 402, 403) or error_type in ACCOUNT_ERROR_TYPES:
        return ACCOUNT
    if status == 413 or (error_type in REQUEST_ERROR_TYPES and (status is None or 400 <= status < 500)):
        return ABOUT_REQUEST
    return SERVICE


class GaveUpError(ApiError):
    """A transient failure outlasted the retries (RetryPolicy: count and time): the run stops here, and
    the job stays resumable. Not a TransientApiError, so that no caller retries it again."""


class NoBatchApiError(ApiError):
    """A gateway answered the batches endpoint 404/405: it has no Message Batches API. No batch was made."""


class AmbiguousCreateError(ApiError):
    """A batch create failed in a way that leaves open whether the batch exists."""


class RequestTooLargeError(ApiError):
    """413: the batch must be split."""


# ---- not a user's error -----------------------------------------------------------------------
class ColumnTypeConflict(Exception):
    """A column's type, inferred from the first rows, does not fit a later row (or would change its
    text there, like 007 read as 7; a JSONL key first seen late): the input must be read again from the
    start. The source has already pinned what did not hold (see InputSource.pins). Raised by the readers
    of inputs.py and csv_input.py, caught by whoever reads the input (the plan), never shown to a user."""

    def __init__(self, column: Optional[str]):
        super().__init__(column or "(schema)")
        self.column = column
