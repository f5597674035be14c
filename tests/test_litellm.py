"""End to end through a real LiteLLM proxy (installed with the test extras), its replies mocked
(`mock_response` in its config: no upstream is called): the gateway users actually meet.

LiteLLM serves POST /v1/messages (both auth styles, under a path prefix with SERVER_ROOT_PATH) and has
no Message Batches API (404 {"detail": "Not Found"}); its mock replies report 503 output tokens whatever
max_tokens was asked for.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

from batchrun.errors import ExitCode
from tests.conftest import make_tickets, refused

# found, not imported: importing litellm takes seconds, and the proxy runs in its own process
if importlib.util.find_spec("litellm") is None or importlib.util.find_spec("fastapi") is None:
    pytest.skip("litellm[proxy] is not installed (pip install -e '.[test]')", allow_module_level=True)

KEY = "sk-litellm-master-0123456789"
MODEL = "claude-haiku-4-5"
PREFIX = "/gw"
CONFIG = f"""
model_list:
  - model_name: {MODEL}
    litellm_params:
      model: anthropic/{MODEL}
      api_key: not-a-real-upstream-key
      mock_response: "positive"
general_settings:
  master_key: {KEY}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def litellm_proxy(tmp_path_factory):
    """One LiteLLM proxy for the session (it takes a few seconds to start), under the path prefix /gw."""
    exe = Path(sys.executable).with_name("litellm")
    if not exe.exists():
        exe = shutil.which("litellm")
        if exe is None:
            pytest.skip("the litellm command is not installed")
    home = tmp_path_factory.mktemp("litellm")
    (home / "config.yaml").write_text(CONFIG)
    port = _free_port()
    env = dict(os.environ, SERVER_ROOT_PATH=PREFIX, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR",
               LITELLM_TELEMETRY="False", NO_PROXY="127.0.0.1,localhost")
    env.pop("DATABASE_URL", None)
    log = open(home / "proxy.log", "wb")
    proc = subprocess.Popen([str(exe), "--config", str(home / "config.yaml"), "--host", "127.0.0.1",
                             "--port", str(port)], cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the LiteLLM proxy exited ({proc.returncode}): "
                            f"{(home / 'proxy.log').read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(base + PREFIX + "/health/liveliness", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the LiteLLM proxy did not start within 90 s")
            time.sleep(0.25)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def job(tmp_path, monkeypatch, litellm_proxy):
    rows = make_tickets(8)
    with open(tmp_path / "t.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", litellm_proxy + PREFIX)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    return ["run", "--input", tmp_path / "t.csv", "--output", tmp_path / "o.parquet", "--id-column", "ticket_id",
            "--prompt", "Sentiment of: {{ body }}", "--model", MODEL, "--max-tokens", "50",
            "--state", tmp_path / "s.sqlite"]


@pytest.mark.parametrize("auth", ["bearer", "x-api-key"])
def test_messages_mode_through_litellm_with_a_path_prefix(cli, job, tmp_path, auth):
    r = cli(*job, "--mode", "messages", "--auth-header", auth)
    assert r.exit_code == 0, r.output
    got = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert [g["status"] for g in got] == ["succeeded"] * 8 and {g["text"] for g in got} == {"positive"}
    assert all(g["output_tokens"] == 503 and g["cost_usd"] > 0 for g in got)    # as LiteLLM reported it
    assert "8 replies reported more output tokens than their max_tokens" in r.output
    assert f"over POST {os.environ['ANTHROPIC_BASE_URL']}/v1/messages" in r.output
    r = cli(*job, "--mode", "messages", "--auth-header", auth)
    assert r.exit_code == 0 and "this run: nothing sent" in r.output


def test_batch_mode_at_litellm_says_use_messages_mode_then_messages_mode_finishes_the_job(cli, job, tmp_path):
    r = cli(*job, "--auth-header", "bearer")
    refused(r, ExitCode.API_ERROR, "no Message Batches API", "--mode messages", "/gw/v1/messages/batches")
    r = cli("status", "--state", tmp_path / "s.sqlite")
    assert "planned" in r.output, r.output
    r = cli(*job, "--auth-header", "bearer", "--mode", "messages")
    assert r.exit_code == 0, r.output
    r = cli("jobs", "--state", tmp_path / "s.sqlite", "--json")
    jobs = json.loads(r.stdout)
    assert len(jobs) == 1 and jobs[0]["state"] == "finished" and jobs[0]["counts"]["succeeded"] == 8, jobs
