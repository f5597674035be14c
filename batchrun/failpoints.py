"""Failpoints: named places where a test can make batchrun die as if killed (SIGKILL), or pause.

Set BATCHRUN_FAILPOINT=name (or name:N to die at the N-th hit). Used by the crash tests to hit the
exact windows that matter (between a batch create and recording its id, mid-download, mid-write);
the crash tests also kill at random moments.

Set BATCHRUN_PAUSE=name=PATH to stop at the first hit of `name`: batchrun creates PATH.paused, then
waits until PATH exists (at most a minute) and goes on. Tests use it to hold a run at a known point
(with the job's lock held) while they start another command.

Set BATCHRUN_DISK_FULL=name (or name:N) to make the N-th hit of `name`, and every later one, fail as a
full disk does (OSError ENOSPC): the no-space tests use it where no small filesystem can be mounted.

All cost one dict lookup when unset.
"""
from __future__ import annotations

import errno
import os
import signal
import time

_hits: dict = {}
_SPEC = os.environ.get("BATCHRUN_FAILPOINT")
_PAUSE = os.environ.get("BATCHRUN_PAUSE")
_FULL = os.environ.get("BATCHRUN_DISK_FULL")
PAUSE_LIMIT = 60.0


def hit(name: str) -> None:
    if _PAUSE:
        _pause(name)
    if _FULL:
        _disk_full(name)
    spec = _SPEC
    if not spec:
        return
    want, _, count = spec.partition(":")
    if want != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _pause(name: str) -> None:
    want, _, gate = _PAUSE.partition("=")
    if want != name or ("pause", name) in _hits:
        return
    _hits["pause", name] = 1
    open(gate + ".paused", "w").close()
    deadline = time.monotonic() + PAUSE_LIMIT
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)


def _disk_full(name: str) -> None:
    want, _, count = _FULL.partition(":")
    if want != name:
        return
    _hits["full", name] = _hits.get(("full", name), 0) + 1
    if _hits["full", name] >= int(count or 1):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
