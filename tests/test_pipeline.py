"""Issue 3: the core pipeline end to end, through the CLI and the library, against the emulator."""
from __future__ import annotations

import json
from decimal import Decimal

import pyarrow.parquet as pq
import pytest

import batchrun
from batchrun.errors import ExitCode
from batchrun.models import load_catalog
from batchrun.output import RESULT_COLUMNS
from tests.conftest import PROMPT, render

MODEL = "claude-haiku-4-5"


def run_args(inp, out, *extra):
    return ["run", "--input", inp, "--output", out, "--id-column", "ticket_id", "--prompt", PROMPT,
            "--model", MODEL, "--max-tokens", 300, "--batch-size", 300, "--poll-interval", "0.2", *extra]


def expected_cost(row) -> float:
    p = load_catalog().resolve(MODEL).prices
    total = (Decimal(row["input_tokens"]) * p.input + Decimal(row["output_tokens"]) * p.output) / Decimal(1_000_000)
    return float(total * Decimal("0.5"))


def check_output(path, source_rows):
    table = pq.read_table(path)
    names = table.column_names
    assert names[:4] == ["ticket_id", "customer", "priority", "body"]
    assert names[4:] == [n for n, _ in RESULT_COLUMNS]
    rows = table.to_pylist()
    assert len(rows) == len(source_rows)
    for got, src in zip(rows, source_rows):
        assert got["ticket_id"] == src["ticket_id"]           # input order, every row once
        assert got["body"] == src["body"]                      # input values kept
        assert got["status"] == "succeeded"
        assert got["custom_id"] == src["ticket_id"]
        assert got["text"].startswith("Reply to: " + render(src)[:120])   # its own reply
        assert got["input_tokens"] > 0 and got["output_tokens"] > 0
        assert got["cost_usd"] == pytest.approx(expected_cost(got), rel=1e-12, abs=1e-15)
        assert got["attempts"] == 1 and got["batch_id"].startswith("msgbatch_")
    assert table.schema.field("priority").type == "int64"      # input types kept
    return rows


def source_rows(path):
    import pyarrow.csv as pacsv
    if str(path).endswith(".csv"):
        return pacsv.read_csv(path, parse_options=pacsv.ParseOptions(newlines_in_values=True)).to_pylist()
    return pq.read_table(path).to_pylist()


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_run_end_to_end(emu, cli, tmp_path, tickets_csv, tickets_parquet, kind):
    inp = tickets_csv if kind == "csv" else tickets_parquet
    out = tmp_path / "out.parquet"
    result = cli(*run_args(inp, out))
    assert result.exit_code == 0, result.output
    assert emu.stats.batches_created == 2                     # 450 rows in batches of 300
    assert emu.stats.requests_created == 450
    rows = check_output(out, source_rows(inp))
    # token counts are those the API reported for that very request
    from batchrun.emulator.replies import reply_for
    for r in rows[:50]:
        params = {"model": MODEL, "max_tokens": 300,
                  "messages": [{"role": "user", "content": render(r)}]}
        usage = reply_for(params)["usage"]
        assert (r["input_tokens"], r["output_tokens"]) == (usage["input_tokens"], usage["output_tokens"])
    # the same command again: nothing new is sent, the same file is written
    first = out.read_bytes()
    again = cli(*run_args(inp, out))
    assert again.exit_code == 0, again.output
    assert emu.stats.batches_created == 2
    assert out.read_bytes() == first


def test_no_wait_advances_to_the_same_output(emu, cli, tmp_path, tickets_csv):
    emu.config.processing_seconds = 0.6
    out = tmp_path / "nowait.parquet"
    codes = []
    for _ in range(60):
        r = cli(*run_args(tickets_csv, out, "--no-wait"))
        codes.append(r.exit_code)
        if r.exit_code != ExitCode.IN_PROGRESS:
            break
        import time
        time.sleep(0.2)
    assert codes[0] == ExitCode.IN_PROGRESS and codes[-1] == 0, codes
    assert emu.stats.batches_created == 2
    waited = tmp_path / "waited.parquet"
    # a fresh state file, one waiting run: the same rows and replies
    r = cli(*run_args(tickets_csv, waited, "--state", tmp_path / "other.sqlite"))
    assert r.exit_code == 0
    a, b = pq.read_table(out).drop(["batch_id"]), pq.read_table(waited).drop(["batch_id"])
    assert a.equals(b)


def test_second_job_in_same_state_pays_nothing_twice(emu, cli, tmp_path, tickets_csv):
    import csv
    state = tmp_path / "state.sqlite"
    r = cli(*run_args(tickets_csv, tmp_path / "one.parquet", "--state", state))
    assert r.exit_code == 0
    # a second job: the same rows plus 20 new ones
    bigger = tmp_path / "bigger.csv"
    rows = list(csv.DictReader(open(tickets_csv, encoding="utf-8", newline="")))
    for i in range(20):
        rows.append({"ticket_id": f"N-{i}", "customer": "Zoë", "priority": "2", "body": f"new ticket {i}"})
    with open(bigger, "w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    r = cli(*run_args(bigger, tmp_path / "two.parquet", "--state", state))
    assert r.exit_code == 0, r.output
    assert emu.stats.requests_created == 470                  # 450 + only the 20 new rows
    assert max(emu.stats.params_submitted.values()) == 1      # no request paid twice
    two = pq.read_table(tmp_path / "two.parquet").to_pylist()
    assert len(two) == 470 and all(r["status"] == "succeeded" for r in two)
    assert sum(1 for r in two if r["cost_usd"] == 0.0) == 450  # reused: paid by the first job
    assert all(r["text"].startswith("Reply to: ") for r in two)


def test_temperature_refused_before_sending(emu, cli, tmp_path, tickets_csv):
    r = cli("run", "--input", tickets_csv, "--output", tmp_path / "o.parquet", "--prompt", PROMPT,
            "--model", "claude-haiku-5-5", "--temperature", "0.2")
    assert r.exit_code == ExitCode.BAD_INPUT
    assert "temperature" in r.output and "claude-haiku-5-5" in r.output
    assert "Traceback" not in r.output
    assert emu.stats.create_calls == 0


def test_library_in_process_and_dataframe(emulator_server, tmp_path, tickets_csv, monkeypatch):
    emulator, _ = emulator_server
    emulator.reset()
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    result = batchrun.run({"input": str(tickets_csv), "output": str(tmp_path / "lib.parquet"),
                           "id_column": "ticket_id", "prompt": PROMPT, "model": MODEL, "max_tokens": 300,
                           "batch_size": 300, "poll_interval": 0.1},
                          api_key="k", base_url="http://emulator.invalid", transport=emulator.sync_transport())
    assert result.finished and result.exit_code == 0
    assert result.counts == {"succeeded": 450}
    check_output(tmp_path / "lib.parquet", source_rows(tickets_csv))

    import pandas as pd
    df = pd.DataFrame({"review": ["good", "bad", "meh"], "n": [1, 2, 3]})
    out = batchrun.run_dataframe(df, prompt="Sentiment of: {{ review }}", model=MODEL, max_tokens=50,
                                 poll_interval=0.1, state=str(tmp_path / "df" / "s.sqlite"),
                                 api_key="k", base_url="http://emulator.invalid",
                                 transport=emulator.sync_transport())
    assert list(out["n"]) == [1, 2, 3]
    assert [t.startswith(f"Reply to: Sentiment of: {w}") for t, w in zip(out["text"], df["review"])] == [True] * 3


# ---- run_dataframe: a persistent default state, the caller's index ---------------------------------

def test_dataframe_twice_without_state_pays_once_and_keeps_the_index(emu, tmp_path, monkeypatch):
    import os
    import stat

    import pandas as pd
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    df = pd.DataFrame({"review": ["good", "bad", "meh"], "n": [1, 2, 3]}, index=[10, 20, 30])
    kw = dict(prompt="Sentiment of: {{ review }}", model=MODEL, max_tokens=50, poll_interval=0.05)
    first = batchrun.run_dataframe(df, **kw)
    assert emu.stats.batches_created == 1
    assert list(first.index) == [10, 20, 30]
    assert [t.startswith(f"Reply to: Sentiment of: {w}") for t, w in zip(first["text"], df["review"])] == [True] * 3
    state = tmp_path / "cache" / "batchrun" / "dataframe-state.sqlite"
    assert stat.S_IMODE(os.stat(state).st_mode) == 0o600
    second = batchrun.run_dataframe(df, **kw)                     # a second identical call: nothing sent
    assert emu.stats.create_calls == 1 and emu.stats.batches_created == 1
    assert list(second.index) == [10, 20, 30]
    assert second["text"].tolist() == first["text"].tolist()
    assert second.attrs["batchrun"]["job_id"] == first.attrs["batchrun"]["job_id"]
    # the same rows under another index and a smoke run of the first two: answers reused, index kept
    again = batchrun.run_dataframe(df.set_axis(["a", "b", "c"]), limit=2, **kw)
    assert list(again.index) == ["a", "b"] and emu.stats.create_calls == 1
    assert again["text"].tolist() == first["text"].tolist()[:2]


# ---- refused at plan: nothing sent -----------------------------------------------------------------

@pytest.mark.parametrize("cell", ['""', '"   "'])
def test_a_row_rendering_an_empty_prompt_is_refused_before_sending(emu, cli, tmp_path, cell):
    inp = tmp_path / "in.csv"
    inp.write_text(f"id,text\na,hello\nb,{cell}\nc,bye\n", encoding="utf-8")
    r = cli("run", "--input", inp, "--output", tmp_path / "o.parquet", "--id-column", "id",
            "--prompt", "{{ text }}", "--model", MODEL, "--max-tokens", 50)
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    assert "Traceback" not in r.output
    (line,) = [l for l in r.output.splitlines() if l.startswith("batchrun: error:")]
    assert "row 2" in line and "'b'" in line and "'{{ text }}'" in line and "empty" in line
    assert emu.stats.create_calls == 0
