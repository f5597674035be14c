"""Issue 3: the core pipeline end to end, through the CLI and the library, against the emulator."""
from __future__ import annotations

from decimal import Decimal

import pyarrow.parquet as pq
import pytest

import batchrun
from batchrun.errors import ExitCode
from batchrun.models import load_catalog
from batchrun.output import RESULT_COLUMNS
from tests.conftest import PROMPT, render, row_id

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


def test_library_in_process_and_dataframe(fresh_emulator, tmp_path, tickets_csv, monkeypatch):
    emulator = fresh_emulator
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


@pytest.mark.parametrize("prompt", ["{{ ''.__class__.__mro__ }}", "{{ customer.__class__ }}",
                                    "{{ cycler.__init__.__globals__ }}", "{{ row.__class__.__subclasses__() }}"])
def test_unsafe_template_is_refused_by_the_sandbox(emu, cli, tmp_path, tickets_csv, prompt):
    r = cli("run", "--input", tickets_csv, "--output", tmp_path / "o.parquet", "--id-column", "ticket_id",
            "--prompt", prompt, "--model", MODEL, "--max-tokens", 50)
    assert r.exit_code == ExitCode.BAD_INPUT, r.output
    assert "Traceback" not in r.output
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("batchrun: error: prompt:") and "unsafe" in lines[0], r.output
    assert emu.stats.create_calls == 0


# ---- custom_ids derived from ids the API does not accept ---------------------------------------------

def test_derived_custom_ids_are_stable_unique_and_in_the_output(emu, cli, tmp_path):
    import csv
    import re
    ids = ["abc def", "x/y", "é", "n" * 70, "n" * 69, "ok-1", "x_y"]
    inp = tmp_path / "ids.csv"
    with open(inp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "body"])
        w.writerows([i, f"body {n}"] for n, i in enumerate(ids))
    outputs = []
    for run_no in range(2):   # two runs with their own state: the same custom_ids
        out = tmp_path / f"out{run_no}.parquet"
        r = cli("run", "--input", inp, "--output", out, "--state", tmp_path / f"s{run_no}.sqlite", "--id-column",
                "id", "--prompt", "{{ body }}", "--model", MODEL, "--max-tokens", 50, "--poll-interval", "0.05")
        assert r.exit_code == 0, r.output
        outputs.append(pq.read_table(out).to_pylist())
    first, second = outputs
    cids = [row["custom_id"] for row in first]
    assert [row["id"] for row in first] == ids
    assert cids == [row["custom_id"] for row in second]
    assert len(set(cids)) == len(ids) and all(re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", c) for c in cids)
    assert cids[5:] == ["ok-1", "x_y"] and all(c not in ids for c in cids[:5])
    assert {row_id(c) for c in emu.stats.submitted_custom_ids} == set(cids)
    assert [row["text"].split(" #")[0] for row in first] == [f"Reply to: body {n}" for n in range(len(ids))]


# ---- an unknown model: cost null, said once -----------------------------------------------------------

def test_unknown_model_costs_null_and_warns_once(emu, cli, tmp_path, tickets_csv):
    emu.config.extra_models = ("claude-nonexistent-9",)
    out = tmp_path / "o.parquet"
    r = cli("run", "--input", tickets_csv, "--output", out, "--id-column", "ticket_id", "--prompt", PROMPT,
            "--model", "claude-nonexistent-9", "--allow-unknown-model", "--max-tokens", 50, "--batch-size", 150,
            "--poll-interval", "0.05")
    assert r.exit_code == 0, r.output
    assert emu.stats.batches_created == 3
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 450 and all(row["status"] == "succeeded" for row in rows)
    assert all(row["cost_usd"] is None for row in rows)
    warnings = [l for l in r.output.splitlines() if "WARNING" in l or "warning" in l]
    assert len(warnings) == 1 and "claude-nonexistent-9" in warnings[0] and "cost" in warnings[0], r.output
    assert "cost: unknown" in r.output


# ---- the connection: a base URL with a path prefix, the anthropic-version header -------------------------

def test_base_url_with_a_path_prefix_in_batch_mode(emu, cli, tmp_path, tickets_csv, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_BASE_URL", emu.base_url + "/gateway/anthropic/")
    out = tmp_path / "o.parquet"
    r = cli(*run_args(tickets_csv, out, "--limit", 40))
    assert r.exit_code == 0, r.output
    assert emu.stats.batches_created == 1
    assert set(emu.stats.prefixes) == {"/gateway/anthropic"}      # every call (create, poll, results) under it
    assert emu.stats.results_downloads >= 1
    assert all(row["status"] == "succeeded" for row in pq.read_table(out).to_pylist())


@pytest.mark.parametrize("version", ["2023-06-01", "2026-10-21"])
def test_the_api_version_header_is_sent(emu, cli, tmp_path, tickets_csv, version):
    r = cli(*run_args(tickets_csv, tmp_path / "o.parquet", "--limit", 20, "--api-version", version))
    assert r.exit_code == 0, r.output
    assert set(emu.stats.api_versions) == {version} and sum(emu.stats.api_versions.values()) >= 3


# ---- cost with prompt caching ----------------------------------------------------------------------------

@pytest.mark.parametrize("ttl", ["5m", "1h"])
def test_cost_with_a_cached_system_prompt(emu, cli, tmp_path, tickets_csv, ttl):
    system = tmp_path / "guide.txt"
    system.write_text("\n".join(f"Rule {i}: answer support tickets politely, briefly and in the customer's "
                                f"language; quote the ticket number {i} when useful." for i in range(250)),
                      encoding="utf-8")                                 # ~30k characters: past 4,096 tokens
    out = tmp_path / "o.parquet"
    r = cli(*run_args(tickets_csv, out, "--limit", 60, "--system-file", system, "--cache-system",
                      "--cache-ttl", ttl, "--batch-size", 30))
    assert r.exit_code == 0, r.output
    rows = pq.read_table(out).to_pylist()
    writes = [row for row in rows if row["cache_creation_input_tokens"]]
    reads = [row for row in rows if row["cache_read_input_tokens"]]
    assert writes and len(reads) >= 50                        # the cache was written, then read
    assert all(row["cache_read_input_tokens"] > 4096 for row in reads)
    p = load_catalog().resolve(MODEL).prices
    write_rate = p.cache_write_5m if ttl == "5m" else p.cache_write_1h
    assert write_rate > p.input > p.cache_read               # the test tells the rates apart
    for row in rows:
        full = (Decimal(row["input_tokens"]) * p.input + Decimal(row["output_tokens"]) * p.output
                + Decimal(row["cache_creation_input_tokens"]) * write_rate
                + Decimal(row["cache_read_input_tokens"]) * p.cache_read)
        assert row["cost_usd"] == float(full / 1_000_000 / 2)      # exact: Decimal arithmetic, then a float


def test_batch_id_is_the_batch_that_gave_the_row_its_result(emu, cli, tmp_path, tickets_csv):
    """A row's batch_id is the API id of the batch whose result it shows: the last one it was sent in, also for a
    row sent again after an errored or expired result, and for one whose attempts ran out (the batch's id is
    read from the batch the row ended in; the rows are not rewritten when a batch is created), and for a row
    whose result line never came (it ends result_missing in its batch, no result recorded)."""
    emu.config.errored_rate = 0.3
    emu.config.expired_rate = 0.1
    emu.config.missing_result_lines = 1
    out = tmp_path / "o.parquet"
    r = cli(*run_args(tickets_csv, out, "--state", tmp_path / "s.sqlite", "--max-attempts", "2", "--batch-size", 100))
    assert r.exit_code in (0, ExitCode.FAILED_ROWS), r.output
    last_batch: dict = {}
    for batch_id in emu.stats.accepted:   # (oldest first)
        for custom_id, _ in emu.stats.accepted[batch_id]:
            last_batch[row_id(custom_id)] = batch_id
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 450
    assert max(r["attempts"] for r in rows) > 1 and {r["status"] for r in rows} > {"succeeded"}   # (both kinds met)
    assert any(r["error_type"] == "result_missing" for r in rows)
    for row in rows:
        assert row["batch_id"] == last_batch[row["custom_id"]], row
