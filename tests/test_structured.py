"""Issue 5: output schemas → typed columns, label sets, cached system prompts, per-model requests."""
from __future__ import annotations

import json
import shutil
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.emulator.replies import reply_for
from batchrun.errors import ExitCode
from batchrun.models import load_catalog
from batchrun.store import Store

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "jobs"


def run_job(cli, job, tmp_path, *extra):
    out, state = tmp_path / f"{job}.parquet", tmp_path / "state.sqlite"
    r = cli("run", JOBS / f"{job}.toml", "--output", out, "--state", state, "--poll-interval", "0.1", *extra)
    return r, out, state


def bodies(state):
    with Store(str(state)) as s:
        return {cid: params for _, cid, params in s.params()}


def exact_cost(model, row):
    p = load_catalog().resolve(model).prices
    total = (Decimal(row["input_tokens"]) * p.input + Decimal(row["output_tokens"]) * p.output
             + Decimal(row["cache_creation_input_tokens"] or 0) * p.cache_write_5m
             + Decimal(row["cache_read_input_tokens"] or 0) * p.cache_read)
    return float(total / Decimal(1_000_000) * Decimal("0.5"))


@pytest.mark.parametrize("model", ["claude-haiku-4-5", "claude-opus-5-5"])
def test_label_tickets_schema_columns_cache_and_cost(emu, cli, tmp_path, model):
    r, out, state = run_job(cli, "label-tickets", tmp_path, "--model", model)
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    schema = table.schema
    assert schema.field("category").type == pa.string()
    assert schema.field("urgency").type == pa.int64()
    assert schema.field("tags").type == pa.list_(pa.string())
    assert schema.field("needs_human").type == pa.bool_()
    sent = bodies(state)
    rows = table.to_pylist()
    assert len(rows) == 300
    for row in rows:
        params = sent[row["custom_id"]]
        assert "tool_choice" not in params                      # structured output, not a forced tool
        assert params["output_config"]["format"]["type"] == "json_schema"
        reply = json.loads(reply_for(params)["content"][-1]["text"])
        assert {k: row[k] for k in ("category", "urgency", "tags", "needs_human")} == reply   # its own reply
        assert 1 <= row["urgency"] <= 5 and len(row["tags"]) <= 5
        assert row["status"] == "succeeded"
        assert row["cost_usd"] == pytest.approx(exact_cost(model, row), rel=1e-12)
    reads = sum(1 for row in rows if row["cache_read_input_tokens"])
    assert reads >= 0.95 * len(rows)                           # nearly every row reads the cached prompt
    with Store(str(state)) as s:                               # the shared prompt is stored once, not per row
        assert s.one("SELECT max(length(body)) AS n FROM bodies")["n"] < 5000
        assert len(s.one("SELECT shared_params FROM jobs")["shared_params"]) > 20000


def test_forced_tool_on_a_model_without_structured_output(emu, cli, tmp_path):
    r, out, state = run_job(cli, "label-tickets", tmp_path, "--model", "claude-sonnet-4", "--limit", "20")
    assert r.exit_code == 0, r.output
    sent = bodies(state)
    params = next(iter(sent.values()))
    assert params["tool_choice"] == {"type": "tool", "name": "record_output"}
    assert "output_config" not in params
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 20 and all(row["status"] == "succeeded" for row in rows)
    assert all(row["category"] in ("billing", "account", "bug", "feature_request", "shipping", "refund",
                                   "praise", "other") for row in rows)


def test_classify_reviews_label_column(emu, cli, tmp_path):
    r, out, _ = run_job(cli, "classify-reviews", tmp_path)
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    assert table.schema.field("label").type == pa.string()
    labels = table.column("label").to_pylist()
    assert len(labels) == 400 and set(labels) <= {"positive", "negative", "neutral", "mixed"}
    assert len(set(labels)) > 1


def test_multi_label_gives_a_list_column(emu, cli, tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("id,text\n1,great and cheap\n2,slow but pretty\n3,meh\n")
    out = tmp_path / "o.parquet"
    r = cli("run", "--input", csv, "--output", out, "--id-column", "id", "--prompt", "{{ text }}",
            "--labels", "price,speed,looks", "--multi-label", "--model", "claude-haiku-4-5",
            "--max-tokens", "100", "--poll-interval", "0.1")
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    assert t.schema.field("label").type == pa.list_(pa.string())
    assert all(set(v) <= {"price", "speed", "looks"} for v in t.column("label").to_pylist())


def test_summarise_articles_free_text(emu, cli, tmp_path):
    r, out, _ = run_job(cli, "summarise-articles", tmp_path)
    assert r.exit_code == 0, r.output
    t = pq.read_table(out)
    assert t.num_rows == 200 and t.schema.field("text").type == pa.string()
    assert t.schema.field("published").type == pq.read_table(ROOT / "samples/articles.parquet").schema.field("published").type
    assert all(s == "succeeded" for s in t.column("status").to_pylist())


def test_reply_that_does_not_fit_is_invalid_output_not_a_crash(emu, cli, tmp_path):
    r, out, _ = run_job(cli, "label-tickets", tmp_path, "--max-tokens", "3", "--limit", "10")
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 10
    for row in rows:
        assert row["status"] == "invalid_output"
        assert row["text"]                                     # raw reply kept
        assert "JSON" in row["error_message"]
        assert row["category"] is None


def test_temperature_on_haiku_5_5_refused_naming_temperature(emu, cli, tmp_path):
    r, _, _ = run_job(cli, "classify-reviews", tmp_path, "--temperature", "0.3")
    assert r.exit_code == ExitCode.BAD_INPUT
    assert "temperature" in r.output and "Traceback" not in r.output
    assert emu.stats.create_calls == 0


def test_small_system_prompt_with_cache_warns(emu, cli, tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("id,text\n1,a\n")
    r = cli("validate", "--input", csv, "--prompt", "{{ text }}", "--system", "Be brief.", "--cache-system",
            "--model", "claude-haiku-4-5")
    assert r.exit_code == 0, r.output
    assert "will not be cached" in r.output
