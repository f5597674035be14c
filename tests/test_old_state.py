"""A state file made by the code before issue #17's changes (main at 2796f61: tests/data/state-before-17,
a job planned by `batchrun estimate --emulator`, nothing sent) still opens, and its job resumes and
finishes: the stored requests are sent as they were stored, their hashes unchanged, each row once."""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pyarrow.parquet as pq

DATA = Path(__file__).parent / "data" / "state-before-17"
FLAGS = ["--input", "in.csv", "--state", "state.sqlite", "--id-column", "id", "--prompt",
         "Review {{ title }}: {{ body }}", "--model", "claude-haiku-4-5", "--max-tokens", "64",
         "--output", "out.parquet"]


def stored(path: Path) -> list:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT job_id, custom_id, params_hash, state, attempts FROM requests "
                          "ORDER BY row_index").fetchall()


def test_a_state_file_from_before_opens_and_its_job_resumes(cli, tmp_path, monkeypatch, quick_builtin_emulator):
    for name in ("in.csv", "state.sqlite"):
        shutil.copy(DATA / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    before = stored(tmp_path / "state.sqlite")
    assert [r[3] for r in before] == ["pending"] * 4

    r = cli("status", "--state", "state.sqlite")
    assert r.exit_code == 0, r.output
    assert before[0][0][:12] in r.output

    r = cli("run", "--emulator", "--poll-interval", "0.1", "-q", *FLAGS)
    assert r.exit_code == 0, r.output
    after = stored(tmp_path / "state.sqlite")
    # the same job (no second plan), the same hashes, every row answered at its first attempt
    assert [(j, c, h) for j, c, h, _, _ in after] == [(j, c, h) for j, c, h, _, _ in before]
    assert [(s, a) for *_, s, a in after] == [("succeeded", 1)] * 4
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [row["id"] for row in rows] == ["A1", "A2", "A3", "A4"]
    assert rows[0]["text"].startswith("Reply to: Review Zoë: naïve café ✓, \"quoted\"\nsecond line #")
    assert rows[3]["text"].startswith("Reply to: Review Ok: fine, thanks #")
