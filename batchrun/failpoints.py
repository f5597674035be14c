"""Failpoints: named places where a test can make batchrun die as if killed (SIGKILL).

Set BATCHRUN_FAILPOINT=name (or name:N to die at the N-th hit). Used by the crash tests to hit the
exact windows that matter (between a batch create and recording its id, mid-download, mid-write);
the crash tests also kill at random moments. Costs one dict lookup when unset.
"""
from __future__ import annotations

import os
import signal

_hits: dict = {}
_SPEC = os.environ.get("BATCHRUN_FAILPOINT")


def hit(name: str) -> None:
    spec = _SPEC
    if not spec:
        return
    want, _, count = spec.partition(":")
    if want != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
