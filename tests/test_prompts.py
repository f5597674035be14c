"""Issue 5: richer prompts (few-shot, prefill, images, per-row max_tokens, thinking), and request
bodies that the official SDK's types accept."""
from __future__ import annotations

import base64
import json
import typing
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from anthropic.types import MessageCreateParams
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming
from pydantic import TypeAdapter

from batchrun.emulator.replies import scale, tokens
from batchrun.errors import ExitCode
from batchrun.store import Store

ROOT = Path(__file__).resolve().parent.parent
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")
SDK_KEYS = set(typing.get_type_hints(MessageCreateParamsNonStreaming))
ADAPTER = TypeAdapter(MessageCreateParamsNonStreaming)


def bodies(state):
    with Store(str(state)) as s:
        return [params for _, _, params in s.params()]


def assert_sdk_accepts(body):
    assert set(body) <= SDK_KEYS, set(body) - SDK_KEYS
    ADAPTER.validate_python(body)


def test_few_shot_prefill_and_per_row_max_tokens(emu, cli, tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("id,text,budget\n1,the cat sat,20\n2,the dog ran,\n3,a bird sang,35\n")
    job = tmp_path / "job.toml"
    job.write_text('''
input = "t.csv"
output = "o.parquet"
id_column = "id"
prompt = "Animal in: {{ text }}"
model = "claude-haiku-4-5"
max_tokens = 60
max_tokens_column = "budget"
prefill = "The animal is"
stop_sequences = ["\\n\\n"]
metadata = {user_id = "team-a"}
few_shot = [{user = "Animal in: a cow mooed", assistant = "The animal is a cow."}]
''')
    r = cli("run", job, "--poll-interval", "0.1")
    assert r.exit_code == 0, r.output
    sent = bodies(tmp_path / "batchrun-state.sqlite")
    assert [b["max_tokens"] for b in sent] == [20, 60, 35]
    first = sent[0]
    assert [m["role"] for m in first["messages"]] == ["user", "assistant", "user", "assistant"]
    assert first["messages"][-1] == {"role": "assistant", "content": "The animal is"}
    assert first["metadata"] == {"user_id": "team-a"} and first["stop_sequences"] == ["\n\n"]
    for body in sent:
        assert_sdk_accepts(body)
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert all(r["status"] == "succeeded" for r in rows)
    assert not any(r["text"].startswith("The animal is") for r in rows)   # the reply continues the prefill


def test_image_column_paths_urls_and_a_bad_file(emu, cli, tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    (tmp_path / "notes.txt").write_text("not an image")
    table = pa.table({"id": ["a", "b", "c"],
                      "image": [str(tmp_path / "a.png"), "https://example.com/cat.jpg", None],
                      "caption": ["one", "two", "three"]})
    pq.write_table(table, tmp_path / "imgs.parquet")
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    r = cli("run", "--input", tmp_path / "imgs.parquet", "--output", out, "--state", state, "--id-column", "id",
            "--prompt", "Describe: {{ caption }}", "--image-column", "image", "--model", "claude-haiku-4-5",
            "--max-tokens", "50", "--poll-interval", "0.1")
    assert r.exit_code == 0, r.output
    sent = bodies(state)
    png_block = sent[0]["messages"][0]["content"][0]
    assert png_block["source"]["media_type"] == "image/png"
    assert base64.b64decode(png_block["source"]["data"]) == PNG
    assert sent[1]["messages"][0]["content"][0]["source"] == {"type": "url", "url": "https://example.com/cat.jpg"}
    assert sent[2]["messages"][0]["content"] == "Describe: three"          # empty cell: no image
    for body in sent:
        assert_sdk_accepts(body)
    bad = pa.table({"id": ["a"], "image": [str(tmp_path / "notes.txt")], "caption": ["x"]})
    pq.write_table(bad, tmp_path / "bad.parquet")
    r = cli("run", "--input", tmp_path / "bad.parquet", "--output", out, "--state", state,
            "--prompt", "{{ caption }}", "--image-column", "image", "--model", "claude-haiku-4-5")
    assert r.exit_code == ExitCode.BAD_INPUT
    assert "image" in r.output and "row 1" in r.output and "PNG" in r.output


def test_image_bytes_from_a_column_and_a_text_file_named_png(emu, cli, tmp_path):
    gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"
    table = pa.table({"id": ["a", "b", "c"], "image": pa.array([PNG, gif, None], pa.binary()),
                      "caption": ["one", "two", "three"]})
    pq.write_table(table, tmp_path / "imgs.parquet")
    out, state = tmp_path / "o.parquet", tmp_path / "s.sqlite"
    r = cli("run", "--input", tmp_path / "imgs.parquet", "--output", out, "--state", state, "--id-column", "id",
            "--prompt", "Describe: {{ caption }}", "--image-column", "image", "--model", "claude-haiku-4-5",
            "--max-tokens", "50", "--poll-interval", "0.1")
    assert r.exit_code == 0, r.output
    sent = bodies(state)
    for body, data, media in ((sent[0], PNG, "image/png"), (sent[1], gif, "image/gif")):
        source = body["messages"][0]["content"][0]["source"]
        assert source["media_type"] == media and base64.b64decode(source["data"]) == data
        assert_sdk_accepts(body)
    assert sent[2]["messages"][0]["content"] == "Describe: three"
    assert pq.read_table(out).column("status").to_pylist() == ["succeeded"] * 3
    # the content decides, not the name: a text file called .png, and bytes that are no image
    (tmp_path / "fake.png").write_text("not an image at all")
    for cells in ([str(tmp_path / "fake.png")], pa.array([b"just some bytes"], pa.binary())):
        pq.write_table(pa.table({"id": ["a"], "image": cells, "caption": ["x"]}), tmp_path / "bad.parquet")
        r = cli("run", "--input", tmp_path / "bad.parquet", "--output", out, "--state", tmp_path / "s2.sqlite",
                "--prompt", "{{ caption }}", "--image-column", "image", "--model", "claude-haiku-4-5")
        assert r.exit_code == ExitCode.BAD_INPUT
        (line,) = [l for l in r.output.splitlines() if l.startswith("batchrun: error:")]
        assert "image: row 1:" in line and "not a PNG, JPEG, GIF or WebP image" in line
    assert emu.stats.create_calls == 1


def test_thinking_blocks_stay_out_of_text(emu, cli, tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("id,msg\n1,hello\n2,world\n")
    out = tmp_path / "o.parquet"
    r = cli("run", "--input", csv, "--output", out, "--state", tmp_path / "s.sqlite", "--prompt", "{{ msg }}",
            "--model", "claude-sonnet-5", "--max-tokens", "2000", "--effort", "low", "--poll-interval", "0.1")
    assert r.exit_code == 0, r.output
    rows = pq.read_table(out).to_pylist()
    for row in rows:
        assert row["text"].startswith("Reply to: ")                      # no thinking text in it
        assert row["output_tokens"] > scale(tokens(row["text"]), True)     # the thinking was counted
    body = bodies(tmp_path / "s.sqlite")[0]
    assert body["output_config"] == {"effort": "low"}
    assert_sdk_accepts(body)


def test_thinking_model_with_little_room_warns(emu, cli, tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("id,text\n1,hello\n")
    r = cli("validate", "--input", csv, "--prompt", "{{ text }}", "--model", "claude-haiku-5-5", "--max-tokens", "50")
    assert r.exit_code == 0
    assert "leave room for the answer" in r.output


@pytest.mark.parametrize("job,model", [("label-tickets", None), ("label-tickets", "claude-sonnet-4"),
                                       ("classify-reviews", None), ("summarise-articles", None)])
def test_bodies_of_the_ready_jobs_validate_against_the_sdk(emu, cli, tmp_path, job, model):
    extra = ["--model", model] if model else []
    r = cli("validate", ROOT / "jobs" / f"{job}.toml", "--show", "3", *extra)
    assert r.exit_code == 0, r.output
    text = r.output[r.output.index("\n{") + 1:]
    decoder, pos, shown = json.JSONDecoder(), 0, []
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        obj, pos = decoder.raw_decode(text, pos)
        shown.append(obj)
    assert len(shown) == 3
    for item in shown:
        assert_sdk_accepts(item["params"])
        TypeAdapter(MessageCreateParams).validate_python(item["params"])


def test_thinking_budget_with_little_room_warns(emu, cli, tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("id,text\n1,hello\n")
    args = ["validate", "--input", csv, "--prompt", "{{ text }}", "--model", "claude-haiku-4-5", "--thinking", "2000"]
    r = cli(*args, "--max-tokens", "2100")      # 100 tokens left for the answer
    assert r.exit_code == 0, r.output
    assert "leave room for the answer" in r.output and "(enabled)" in r.output
    r = cli(*args, "--max-tokens", "4000")
    assert r.exit_code == 0, r.output
    assert "leave room" not in r.output
