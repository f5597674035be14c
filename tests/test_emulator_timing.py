"""The emulator's timing mode (`batchrun emulator --timing`, issue #17): a lean server and lean replies,
so that a benchmark measures the client and not the emulator. Still the API's protocol: the official
SDK reads its replies, batchrun runs a job against it, a dropped create is found again."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import zlib

import anthropic
import httpx
import pyarrow.parquet as pq
import pytest
from anthropic.types.messages import MessageBatchIndividualResponse

from batchrun.emulator import replies

HAIKU = "claude-haiku-4-5"


@pytest.fixture(scope="module")
def timing_server():
    """`batchrun emulator --timing --port 0` in its own process; yields its base URL."""
    proc = subprocess.Popen([sys.executable, "-c", "from batchrun.cli import main; main()", "emulator", "--timing",
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "listening on" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    base_url = line.split("listening on ", 1)[1].split()[0]
    yield base_url
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def control(timing_server):
    with httpx.Client(base_url=timing_server, timeout=30) as client:
        client.post("/_emulator/reset")
        yield client


def expected_text(prompt: str, max_tokens: int) -> tuple[str, int, str]:
    """The reply the timing mode gives to one user message: text, output tokens, stop reason."""
    full = f"Reply to: {prompt[:120]} #{zlib.crc32(prompt.encode('utf-8')):08x}"
    if math.ceil(len(full) / 4) <= max_tokens:
        return full, math.ceil(len(full) / 4), "end_turn"
    cut = full[:max_tokens * 4]
    return cut, math.ceil(len(cut) / 4), "max_tokens"


def test_settings(control):
    config = control.get("/_emulator/config").json()
    assert config["lean"] is True and config["validate"] is False and config["processing_seconds"] == 0.0


def test_batch_through_the_sdk(control, timing_server):
    sdk = anthropic.Anthropic(base_url=timing_server, api_key="test", max_retries=0)
    prompts = ["Hello there", "naïve café ✓ " * 30, "x"]
    batch = sdk.messages.batches.create(requests=[
        {"custom_id": f"r{i}", "params": {"model": HAIKU, "max_tokens": 16, "messages": [{"role": "user", "content": p}]}}
        for i, p in enumerate(prompts)])
    assert sdk.messages.batches.retrieve(batch.id).processing_status == "ended"   # at once
    got = {r.custom_id: r for r in sdk.messages.batches.results(batch.id)}
    assert set(got) == {"r0", "r1", "r2"}
    for i, p in enumerate(prompts):
        result = got[f"r{i}"]
        assert isinstance(result, MessageBatchIndividualResponse) and result.result.type == "succeeded"
        text, out, stop = expected_text(p, 16)
        message = result.result.message
        assert message.content[0].text == text
        assert (message.usage.input_tokens, message.usage.output_tokens, message.stop_reason) == \
            (math.ceil(len(p) / 4), out, stop)
    assert got["r1"].result.message.stop_reason == "max_tokens"


def test_a_job_runs_against_it(control, timing_server, cli, tmp_path, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_BASE_URL", timing_server)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-0123456789")
    rows = [("a1", "Broken", "It, \"quoted\"\nsecond line"), ("a2", "Zoë", "李雷 asked again " * 20), ("a3", "", "")]
    data = tmp_path / "in.csv"
    data.write_text("id,title,body\n" + "".join(f'{i},"{t}","{b.replace(chr(34), chr(34) * 2)}"\n'
                                                for i, t, b in rows), encoding="utf-8")
    out = tmp_path / "out.parquet"
    # the first create is answered by a dropped connection: batchrun finds the batch, never sends twice
    control.post("/_emulator/config", json={"drop_after_create": 1})
    r = cli("run", "--input", data, "--output", out, "--state", tmp_path / "s.sqlite", "--id-column", "id",
            "--prompt", "Review {{ title }}: {{ body }}", "--model", HAIKU, "--max-tokens", "64",
            "--poll-interval", "0.05", "-q")
    assert r.exit_code == 0, r.output
    stats = control.get("/_emulator/stats").json()
    assert stats["batches_created"] == 1 and stats["faults"] == {"drop_after_create": 1}
    table = pq.read_table(out).to_pylist()
    assert [t["id"] for t in table] == ["a1", "a2", "a3"]
    for (_, title, body), row in zip(rows, table):
        prompt = f"Review {title}: {body}"
        text, out_tokens, stop = expected_text(prompt, 64)
        assert (row["status"], row["text"], row["stop_reason"]) == ("succeeded", text, stop)
        assert (row["input_tokens"], row["output_tokens"]) == (math.ceil(len(prompt) / 4), out_tokens)


@pytest.mark.parametrize("p", [
    {"model": HAIKU, "max_tokens": 64, "messages": [{"role": "user", "content": "Review x: y"}]},
    {"model": HAIKU, "max_tokens": 3, "temperature": 0.5, "messages": [{"role": "user", "content": "a longer one " * 9}]},
    {"model": "claude-opus-4-1", "max_tokens": 50, "messages": [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "2nd"}]},
])
def test_lean_replies_are_the_general_ones(p):
    """The lean path is a shortcut, not a second rule: the same message as reply_for in the lean mode."""
    token = replies.CHAR_TOKENS.set(True)
    try:
        lean = replies.lean_reply(p, "msg_x")
        assert lean is not None
        assert json.loads(lean) == replies.reply_for(p, message_id="msg_x")
    finally:
        replies.CHAR_TOKENS.reset(token)


def test_other_requests_take_the_general_path():
    token = replies.CHAR_TOKENS.set(True)
    try:
        assert replies.lean_reply({"model": HAIKU, "max_tokens": 9, "system": "s",
                                   "messages": [{"role": "user", "content": "hi"}]}, "m") is None
        assert replies.lean_reply({"model": HAIKU, "max_tokens": 9, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, "m") is None
    finally:
        replies.CHAR_TOKENS.reset(token)
