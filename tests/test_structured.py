"""Issue 5: output schemas → typed columns, label sets, cached system prompts, per-model requests."""
from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchrun.emulator.replies import reply_for
from batchrun.errors import ExitCode
from tests.conftest import refused
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


def exact_cost(p, row, ttl="5m"):
    """A row's cost from the model's prices `p` (load_catalog().resolve(model).prices: read once per test,
    not once per row, since load_catalog parses the catalog file each call)."""
    write = p.cache_write_1h if ttl == "1h" else p.cache_write_5m
    total = (Decimal(row["input_tokens"]) * p.input + Decimal(row["output_tokens"]) * p.output
             + Decimal(row["cache_creation_input_tokens"] or 0) * write
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
    prices = load_catalog().resolve(model).prices
    for row in rows:
        params = sent[row["custom_id"]]
        assert "tool_choice" not in params                      # structured output, not a forced tool
        assert params["output_config"]["format"]["type"] == "json_schema"
        reply = json.loads(reply_for(params)["content"][-1]["text"])
        assert {k: row[k] for k in ("category", "urgency", "tags", "needs_human")} == reply   # its own reply
        assert 1 <= row["urgency"] <= 5 and len(row["tags"]) <= 5
        assert row["status"] == "succeeded"
        # (the job caches for an hour: the default for batch jobs)
        assert row["cost_usd"] == pytest.approx(exact_cost(prices, row, "1h"), rel=1e-12)
    reads = sum(1 for row in rows if row["cache_read_input_tokens"])
    assert reads >= 0.95 * len(rows)                           # nearly every row reads the cached prompt
    with Store(str(state)) as s:                               # the shared prompt is stored once, not per row
        assert s.one("SELECT max(chars) AS n FROM requests")["n"] < 5000   # (a row body's characters)
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


# ------------------------------------------------------------------------------ typed columns end to end

MIXED_SCHEMA = {
    "type": "object",
    "properties": {
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "who": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                "required": ["name", "age"]},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "k": {"type": "string"}, "v": {"type": "integer"}}, "required": ["k", "v"]}},
        "level": {"enum": [1, 2, 3]},
        "scores": {"type": "array", "items": {"enum": [1, 2, 3]}},
        "note": {"type": ["string", "null"]},
        "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    },
    "required": ["score", "who", "items", "level", "scores", "note", "either"],
}
MIXED_TYPES = {
    "score": pa.float64(), "who": pa.struct([("name", pa.string()), ("age", pa.int64())]),
    "items": pa.list_(pa.struct([("k", pa.string()), ("v", pa.int64())])), "level": pa.int64(),
    "scores": pa.list_(pa.int64()), "note": pa.string(), "either": pa.string(),
}


@pytest.mark.parametrize("how", ["flag", "job file"])
def test_output_schema_file_gives_typed_columns_holding_each_reply(emu, cli, tmp_path, how):
    (tmp_path / "schemas").mkdir()
    (tmp_path / "schemas" / "row.json").write_text(json.dumps(MIXED_SCHEMA))
    (tmp_path / "t.csv").write_text("id,msg\n1,alpha\n2,bravo\n3,cedar\n4,delta\n")
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    if how == "flag":
        r = cli("run", "--input", tmp_path / "t.csv", "--output", out, "--state", state, "--prompt", "{{ msg }}",
                "--model", "claude-haiku-4-5", "--output-schema", tmp_path / "schemas" / "row.json",
                "--poll-interval", "0.1")
    else:   # the path in a job file is relative to the job file
        (tmp_path / "jobs").mkdir()
        (tmp_path / "jobs" / "j.toml").write_text(
            'input = "../t.csv"\noutput = "../o.parquet"\nstate = "../s.sqlite"\nprompt = "{{ msg }}"\n'
            'model = "claude-haiku-4-5"\noutput_schema = "../schemas/row.json"\n')
        r = cli("run", tmp_path / "jobs" / "j.toml", "--poll-interval", "0.1")
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    for name, typ in MIXED_TYPES.items():
        assert table.schema.field(name).type == typ, name
    sent = bodies(state)
    for row in table.to_pylist():
        assert row["status"] == "succeeded"
        params = sent[row["custom_id"]]
        assert params["output_config"]["format"]["schema"]["properties"]["note"]["anyOf"] == [
            {"type": "string"}, {"type": "null"}]
        reply = json.loads(reply_for(params)["content"][-1]["text"])
        expected = {**reply, "score": float(reply["score"]), "either": json.dumps(reply["either"])}
        assert {k: row[k] for k in MIXED_TYPES} == expected


@pytest.mark.parametrize("model", ["claude-haiku-4-5", "claude-sonnet-4"])   # structured output; forced tool
def test_reply_that_breaks_the_schema_is_invalid_output_with_its_raw_text(emu, cli, tmp_path, model):
    emu.config.off_schema_rate = 1.0    # every reply breaks a constraint (sent as a note to structured output)
    r, out, state = run_job(cli, "label-tickets", tmp_path, "--model", model, "--limit", "8")
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    rows = pq.read_table(out).to_pylist()
    assert len(rows) == 8
    for row in rows:
        assert row["status"] == "invalid_output"
        assert "at tags" in row["error_message"] and "is too long" in row["error_message"]
        assert len(json.loads(row["text"])["tags"]) > 5                    # the raw reply kept
        assert row["urgency"] is None and row["category"] is None          # nothing half-parsed


def test_valid_reply_too_big_for_its_column_is_invalid_output_not_a_crash(emu, cli, tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1e30}, "s": {"type": "string"}},
              "required": ["n", "s"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "t.csv").write_text("id,msg\n1,alpha\n2,bravo\n")
    out = tmp_path / "o.parquet"
    r = cli("run", "--input", tmp_path / "t.csv", "--output", out, "--state", tmp_path / "s.sqlite",
            "--prompt", "{{ msg }}", "--model", "claude-haiku-4-5", "--output-schema", tmp_path / "schema.json",
            "--poll-interval", "0.1")
    assert r.exit_code == ExitCode.FAILED_ROWS, r.output
    table = pq.read_table(out)
    assert table.schema.field("n").type == pa.int64()
    for row in table.to_pylist():
        assert row["status"] == "invalid_output" and "does not fit column 'n' (int64)" in row["error_message"]
        assert json.loads(row["text"])["n"] >= 10 ** 30 and row["n"] is None and row["s"] is None


# ------------------------------------------------------------------------------ refused before sending

def test_bad_json_schema_refused_before_sending(emu, cli, tmp_path):
    (tmp_path / "schema.json").write_text(json.dumps({"type": "object", "properties": {"x": {"type": "strng"}}}))
    (tmp_path / "t.csv").write_text("id,msg\n1,alpha\n")
    for command in ("validate", "run"):
        r = cli(command, "--input", tmp_path / "t.csv", "--prompt", "{{ msg }}", "--model", "claude-haiku-4-5",
                "--output-schema", tmp_path / "schema.json")
        line = refused(r)
        assert "output_schema" in line and "properties/x/type" in line and "'strng'" in line
    assert emu.stats.create_calls == 0


@pytest.mark.parametrize("extra,needles", [
    (["--model", "claude-sonnet-4", "--thinking", "2000", "--max-tokens", "4000"],
     ["labels", "claude-sonnet-4", "no structured output", "turn thinking off", "model with structured output"]),
    (["--model", "claude-haiku-4-5", "--thinking", "2000", "--max-tokens", "4000", "--temperature", "0.5"],
     ["temperature", "while it thinks"]),
    (["--model", "claude-haiku-4-5", "--thinking", "2000", "--max-tokens", "4000", "--top-k", "5"],
     ["top_k", "while it thinks"]),
])
def test_combinations_the_api_refuses_are_refused_before_sending(emu, cli, tmp_path, extra, needles):
    r, _, _ = run_job(cli, "classify-reviews", tmp_path, "--thinking", "adaptive", *extra)
    line = refused(r)
    for needle in needles:
        assert needle in line, (needle, line)
    assert emu.stats.create_calls == 0


def test_prefill_with_thinking_refused_before_sending(emu, cli, tmp_path):
    (tmp_path / "t.csv").write_text("id,msg\n1,alpha\n")
    r = cli("run", "--input", tmp_path / "t.csv", "--output", tmp_path / "o.parquet", "--prompt", "{{ msg }}",
            "--model", "claude-haiku-4-5", "--thinking", "2000", "--max-tokens", "4000", "--prefill", "The answer:")
    line = refused(r)
    assert "prefill" in line and "while it thinks" in line
    r = cli("run", "--input", tmp_path / "t.csv", "--output", tmp_path / "o.parquet", "--prompt", "{{ msg }}",
            "--model", "claude-haiku-4-5", "--labels", "a,b", "--prefill", '{"label": "')
    assert "prefill: cannot be used with labels" in refused(r)
    assert emu.stats.create_calls == 0


def test_every_rows_max_tokens_is_checked_before_sending(emu, cli, tmp_path):
    rows = "\n".join(f"{i},text {i},{100 if i != 70 else 100000}" for i in range(1, 101))
    (tmp_path / "t.csv").write_text("id,msg,budget\n" + rows + "\n")
    args = ["run", "--input", tmp_path / "t.csv", "--output", tmp_path / "o.parquet", "--id-column", "id",
            "--prompt", "{{ msg }}", "--model", "claude-haiku-4-5", "--max-tokens-column", "budget"]
    line = refused(cli(*args))
    assert "budget: row 70 (id 70): max_tokens 100000" in line and "64000" in line
    (tmp_path / "t.csv").write_text("id,msg,budget\n1,a,3000\n2,b,3000\n3,c,1500\n")
    line = refused(cli(*args, "--thinking", "2000", "--max-tokens", "3000"))
    assert "budget: row 3 (id 3)" in line and "budget_tokens 2000" in line and "less than max_tokens 1500" in line
    assert emu.stats.create_calls == 0


def test_metadata_other_than_user_id_refused_before_sending(emu, cli, tmp_path):
    (tmp_path / "t.csv").write_text("id,msg\n1,alpha\n")
    (tmp_path / "j.toml").write_text('input = "t.csv"\nprompt = "{{ msg }}"\nmodel = "claude-haiku-4-5"\n'
                                     'metadata = {team = "a", user_id = "u-1"}\n')
    assert "metadata: unknown key 'team'" in refused(cli("run", tmp_path / "j.toml"))
    (tmp_path / "j.toml").write_text('input = "t.csv"\nprompt = "{{ msg }}"\nmodel = "claude-haiku-4-5"\n'
                                     'metadata = {user_id = 5}\n')
    assert "metadata: user_id must be a string" in refused(cli("run", tmp_path / "j.toml"))
    assert emu.stats.create_calls == 0


# ------------------------------------------------------------------------------ caching and the catalog

def test_cache_ttl_1h_end_to_end(emu, cli, tmp_path):
    r, out, state = run_job(cli, "label-tickets", tmp_path, "--cache-ttl", "1h", "--limit", "30")
    assert r.exit_code == 0, r.output
    sent = bodies(state)
    assert all(p["system"][0]["cache_control"] == {"type": "ephemeral", "ttl": "1h"} for p in sent.values())
    rows = pq.read_table(out).to_pylist()
    writes = [row for row in rows if row["cache_creation_input_tokens"]]
    assert writes and sum(1 for row in rows if row["cache_read_input_tokens"]) >= len(rows) - len(writes) - 1
    prices = load_catalog().resolve("claude-haiku-4-5").prices
    for row in rows:
        assert row["cost_usd"] == pytest.approx(exact_cost(prices, row, "1h"), rel=1e-12)
    assert exact_cost(prices, writes[0], "1h") > exact_cost(prices, writes[0], "5m")


@pytest.mark.parametrize("structured", [False, True])
def test_catalog_decides_how_the_schema_is_asked_for(emu, cli, tmp_path, structured):
    models = tmp_path / "models.toml"
    models.write_text(f'[models.acme-labeller]\nlike = "claude-haiku-4-5"\nforced_tool = true\n'
                      f'structured_output = {str(structured).lower()}\nprices = {{ input = 1.0, output = 5.0 }}\n')
    emu.config.extra_models = ("acme-labeller",)
    r, out, state = run_job(cli, "label-tickets", tmp_path, "--model", "acme-labeller", "--models", models,
                            "--limit", "5")
    assert r.exit_code == 0, r.output
    params = next(iter(bodies(state).values()))
    if structured:
        assert params["output_config"]["format"]["type"] == "json_schema" and "tools" not in params
    else:
        assert params["tool_choice"] == {"type": "tool", "name": "record_output"} and "output_config" not in params
        assert params["tools"][0]["input_schema"]["properties"]["urgency"]["maximum"] == 5   # the full schema
    rows = pq.read_table(out).to_pylist()
    assert all(row["status"] == "succeeded" and 1 <= row["urgency"] <= 5 for row in rows)
