"""Hostile probes of issue 19's promises (gateways): what a user meets when a gateway answers oddly,
when a run is killed between the refusal and its record, when a server lies about usage."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from batchrun.errors import ExitCode
from tests.conftest import refused
from tests.test_gateway import job_args, status

CLI = [sys.executable, "-c", "from batchrun.cli import main; main()"]


def spawn_run(emu, args, failpoint=None, timeout=60):
    env = {**os.environ, "ANTHROPIC_API_KEY": "sk-ant-test-0123456789", "ANTHROPIC_BASE_URL": emu.base_url}
    env.pop("BATCHRUN_FAILPOINT", None)
    env.pop("BATCHRUN_PAUSE", None)
    if failpoint:
        env["BATCHRUN_FAILPOINT"] = failpoint
    return subprocess.run(CLI + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)


# ---- (1) a gateway without batches, killed between -----------------------------------------------
def test_a_run_killed_after_its_batch_intent_at_a_gateway_without_batches_is_not_stuck(emu, cli, tmp_path):
    emu.config.no_batches = True
    args = job_args(tmp_path, n=6)
    p = spawn_run(emu, args, failpoint="after_intent")
    assert p.returncode == -9, p.stderr
    r = cli(*args)
    refused(r, ExitCode.API_ERROR, "no Message Batches API", "--mode messages")
    jobs = status(cli, tmp_path)
    assert len(jobs) == 1 and jobs[0]["state"] == "planned", jobs
    r = cli(*args, "--mode", "messages")
    assert r.exit_code == 0, r.output
    jobs = status(cli, tmp_path)
    assert len(jobs) == 1 and jobs[0]["counts"]["succeeded"] == 6, jobs
    assert emu.stats.messages_calls == 6


# ---- (4) usage a lying server reports ------------------------------------------------------------
LIES = [{"output_tokens": "503"}, {"output_tokens": -5000}, {"input_tokens": -100000},
        {"output_tokens": None}, {"input_tokens": "many"}, [1, 2], "lots", {"output_tokens": 1e30},
        {"cache_read_input_tokens": -7}, {"output_tokens": True}]


@pytest.mark.parametrize("mode", ["messages", "batch"])
@pytest.mark.parametrize("lie", LIES, ids=[json.dumps(x) for x in LIES])
def test_usage_a_server_lies_about_never_crashes_nor_lowers_the_cost_silently(emu, cli, tmp_path, mode, lie):
    emu.config.usage_patch = lie
    r = cli(*job_args(tmp_path, n=3), "--mode", mode)
    assert "Traceback" not in r.output and "internal error" not in r.output, r.output
    assert r.exit_code == 0, r.output
    rows = pq.read_table(tmp_path / "o.parquet").to_pylist()
    assert [x["status"] for x in rows] == ["succeeded"] * 3
    for x in rows:   # never a negative token count or cost on record
        for k in ("input_tokens", "output_tokens", "cache_creation_input_tokens", "cache_read_input_tokens",
                  "cost_usd"):
            assert x[k] is None or x[k] >= 0, (k, x)
    if lie != {"output_tokens": None}:   # (null is allowed by the API: missing, not a lie)
        assert "cannot be right" in r.output, r.output                    # said, not taken silently
    if not (isinstance(lie, dict) and "cache_read_input_tokens" in lie):
        assert "  usage: 3 replies reported no usage or counts that cannot be read" in r.output, r.output
