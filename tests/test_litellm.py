"""End to end through a real LiteLLM proxy (installed with the test extras), its replies mocked
(`mock_response` in its config: no upstream is called): the gateway users actually meet.

LiteLLM serves POST /v1/messages (both auth styles, under a path prefix with SERVER_ROOT_PATH) and has
no Message Batches API (404 {"detail": "Not Found"}); its mock replies report 503 output tokens whatever
max_tokens was asked for.
"""
from __future__ import annotations

import atexit
import csv
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
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


class Proxy:
    """A LiteLLM proxy process on a free loopback port, under the path prefix /gw, its home a temporary
    directory. Started at once (it takes seconds to import), and brought up in a background thread: once
    it answers, one request is sent through it (its first reply takes it seconds more), so that ready()
    has nothing left to wait for when the tests start early enough."""

    def __init__(self, exe: str):
        self.home = Path(tempfile.mkdtemp(prefix="batchrun-litellm-"))
        (self.home / "config.yaml").write_text(CONFIG)
        self.base = f"http://127.0.0.1:{_free_port()}"
        env = dict(os.environ, SERVER_ROOT_PATH=PREFIX, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR",
                   LITELLM_TELEMETRY="False", NO_PROXY="127.0.0.1,localhost")
        env.pop("DATABASE_URL", None)
        self.log = open(self.home / "proxy.log", "wb")
        self.proc = subprocess.Popen([exe, "--config", str(self.home / "config.yaml"), "--host", "127.0.0.1",
                                      "--port", self.base.rsplit(":", 1)[1]], cwd=self.home, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)
        atexit.register(self.stop)   # a session cut short before the fixture's teardown
        self.failure = None
        self.up = threading.Thread(target=self._bring_up, daemon=True)
        self.up.start()

    def _bring_up(self) -> None:
        with httpx.Client(timeout=1) as http:
            self.failure = self._answers(http)
            if self.failure is None:
                try:   # its first reply (not one a test looks at)
                    http.post(self.base + PREFIX + "/v1/messages", timeout=60,
                              headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
                              json={"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
                except httpx.HTTPError:
                    pass   # the tests' own requests will tell

    def _answers(self, http: httpx.Client):
        """None once the proxy answers, else why it never will."""
        deadline = time.monotonic() + 90
        while True:
            if self.proc.poll() is not None:
                return f"the LiteLLM proxy exited ({self.proc.returncode})"
            try:
                if http.get(self.base + PREFIX + "/health/liveliness").status_code == 200:
                    return None
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                return "the LiteLLM proxy did not start within 90 s"
            time.sleep(0.25)

    def ready(self) -> str:
        self.up.join(180)
        if self.failure or self.up.is_alive():
            pytest.fail(f"{self.failure or 'the LiteLLM proxy did not come up'}: "
                        f"{(self.home / 'proxy.log').read_text(errors='replace')[-2000:]}")
        return self.base

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.home, ignore_errors=True)


_proxy: list = []   # the session's Proxy, once started


def _litellm_exe():
    exe = Path(sys.executable).with_name("litellm")
    return str(exe) if exe.exists() else shutil.which("litellm")


def start_proxy() -> None:
    """Start the session's proxy now, if not started yet (conftest calls this right after collection when
    a test of this module is to run, so that it starts up while the tests before this module run)."""
    exe = _litellm_exe()
    if exe is not None and not _proxy:
        _proxy.append(Proxy(exe))


@pytest.fixture(scope="session")
def litellm_proxy():
    """One LiteLLM proxy for the session (it takes a few seconds to start), under the path prefix /gw."""
    if _litellm_exe() is None:
        pytest.skip("the litellm command is not installed")
    start_proxy()
    try:
        yield _proxy[0].ready()
    finally:
        _proxy.pop().stop()


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
