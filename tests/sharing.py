"""Two jobs sharing requests, started at the same moment on one state file, several times over: the
scaffolding of the tests that then count what the API accepted and billed (test_paid_once,
test_paid_once_attack)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from tests.test_reliability import spawn

Argv = Callable[[Path, Path], list]   # (the pair's directory, its state file) -> a run's argv


def started_together(emu, tmp_path: Path, full: Argv, part: Argv, times: int, at_once: bool = True) -> list:
    """`times` pairs of runs, a full one and a part one (`full(d, state)`, `part(d, state)`), the two of a
    pair started at the same moment on a state file of their own in a directory of their own (returned):
    two jobs of one state file racing each other, `times` over. The pairs run all at once, or one after
    another (`at_once=False`: messages-mode runs, whose thousands of calls the in-process emulator
    answers no faster for being sent by more runs). The emulator is reset first; every run must succeed.

    The pairs share no state file, so none can take another's answers: each pair buys every request at
    least once, and a request the API accepted (or billed) exactly `times` times was bought once by each."""
    emu.reset()
    dirs, runs = [], []
    for attempt in range(times):
        d = tmp_path / str(attempt)
        d.mkdir()
        dirs.append(d)
        state = d / "s.sqlite"
        runs += [spawn(emu, full(d, state)), spawn(emu, part(d, state))]
        if not at_once or attempt == times - 1:
            for p in runs:
                _, err = p.communicate(timeout=180)
                assert p.returncode == 0, err
            runs = []
    return dirs


def bought_once_per_pair(counts, requests: int, times: int) -> None:
    """`counts` (params hash -> how many times the API accepted or billed it) says that each of the
    `requests` requests was bought once by each of the `times` pairs."""
    assert len(counts) == requests and set(counts.values()) == {times}, sorted(set(counts.values()))
