"""Job files and flags: the same names, a flag overrides the file (either form of a key), the
emulator's own state file unless one is given."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import pytest

from batchrun.cli import main
from batchrun.cli.common import FLAG_ALIASES, SPEC_KEYS
from batchrun.errors import ExitCode
from batchrun.spec import _FILE_KEYS, JobSpec


def write_job(tmp_path, body: str, name: str = "job.toml") -> Path:
    (tmp_path / "in.csv").write_text("id,text,lang\na,hello,en\nb,bonjour,fr\n", encoding="utf-8")
    job = tmp_path / name
    job.write_text('input = "in.csv"\noutput = "out.parquet"\nid_column = "id"\nmodel = "claude-haiku-4-5"\n'
                   "max_tokens = 50\n" + body, encoding="utf-8")
    return job


def first_request(cli, *args) -> dict:
    """The first rendered request of `batchrun validate` (which sends nothing)."""
    r = cli("validate", *args, "--show", "1")
    assert r.exit_code == 0, r.output
    return json.loads(r.output[r.output.index("{"):])["params"]


def one_error_line(r, code=ExitCode.BAD_INPUT) -> str:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1, r.output
    return lines[0]


@pytest.mark.parametrize("file_key", ["prompt", "prompt_file"])
@pytest.mark.parametrize("flag", ["--prompt", "--prompt-file"])
def test_a_prompt_flag_replaces_either_prompt_key_of_the_file(cli, tmp_path, file_key, flag):
    (tmp_path / "file-prompt.txt").write_text("From the file: {{ text }}", encoding="utf-8")
    (tmp_path / "flag-prompt.txt").write_text("From the flag: {{ lang }}", encoding="utf-8")
    value = '"From the file: {{ text }}"' if file_key == "prompt" else '"file-prompt.txt"'
    job = write_job(tmp_path, f"{file_key} = {value}\n")
    given = "From the flag: {{ lang }}" if flag == "--prompt" else str(tmp_path / "flag-prompt.txt")
    params = first_request(cli, job, flag, given)
    assert params["messages"] == [{"role": "user", "content": "From the flag: en"}]
    # without the flag, the file's own prompt
    assert first_request(cli, job)["messages"][0]["content"] == "From the file: hello"


@pytest.mark.parametrize("file_key", ["system", "system_file"])
@pytest.mark.parametrize("flag", ["--system", "--system-file"])
def test_a_system_flag_replaces_either_system_key_of_the_file(cli, tmp_path, file_key, flag):
    (tmp_path / "file-system.txt").write_text("file system", encoding="utf-8")
    (tmp_path / "flag-system.txt").write_text("flag system", encoding="utf-8")
    value = '"file system"' if file_key == "system" else '"file-system.txt"'
    job = write_job(tmp_path, f'prompt = "{{{{ text }}}}"\n{file_key} = {value}\n')
    given = "flag system" if flag == "--system" else str(tmp_path / "flag-system.txt")
    assert first_request(cli, job, flag, given)["system"] == "flag system"


def test_labels_and_output_schema_replace_each_other(cli, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"topic": {"type": "string"}},
                                  "required": ["topic"]}), encoding="utf-8")
    job = write_job(tmp_path, 'prompt = "{{ text }}"\nlabels = ["a", "b"]\nmulti_label = true\n')
    params = first_request(cli, job, "--output-schema", schema)
    assert params["output_config"]["format"]["schema"]["properties"] == {"topic": {"type": "string"}}
    job = write_job(tmp_path, f'prompt = "{{{{ text }}}}"\noutput_schema = "{schema}"\n', "job2.toml")
    params = first_request(cli, job, "--labels", "x,y")
    assert params["output_config"]["format"]["schema"]["properties"]["label"]["enum"] == ["x", "y"]


def test_both_forms_in_one_place_stay_an_error(cli, tmp_path):
    (tmp_path / "p.txt").write_text("{{ text }}", encoding="utf-8")
    job = write_job(tmp_path, 'prompt = "{{ text }}"\nprompt_file = "p.txt"\n')
    line = one_error_line(cli("validate", job, "--prompt", "x {{ text }}"))
    assert str(job) in line and "'prompt'" in line and "'prompt_file'" in line
    job = write_job(tmp_path, 'prompt = "{{ text }}"\n', "job2.toml")
    line = one_error_line(cli("validate", job, "--prompt", "{{ text }}", "--prompt-file", tmp_path / "p.txt"))
    assert "give either 'prompt' or 'prompt_file', not both" in line and str(job) not in line
    job = write_job(tmp_path, 'prompt = "{{ text }}"\nlabels = ["a", "b"]\noutput_schema = {properties = {x = {type = "string"}}}\n',
                    "job3.toml")
    assert "not both" in one_error_line(cli("validate", job))


def test_library_overrides_replace_the_alternative_too(tmp_path):
    (tmp_path / "p.txt").write_text("file {{ text }}", encoding="utf-8")
    from batchrun.library import load_spec
    base = {"input": str(write_job(tmp_path, "").parent / "in.csv"), "prompt": "{{ text }}"}
    assert load_spec(base, prompt_file=str(tmp_path / "p.txt")).prompt == "file {{ text }}"
    spec = load_spec(base, labels=["a", "b"])
    assert load_spec(spec, output_schema={"properties": {"x": {"type": "string"}}}).labels is None


# ---- flag names are job-file keys ----------------------------------------------------------------

def test_every_job_flag_is_named_as_its_key():
    keys = {f.name for f in dataclasses.fields(JobSpec)} - {"source"} | set(_FILE_KEYS)
    for command in ("run", "validate", "estimate", "cancel"):
        for param in main.commands[command].params:
            if not isinstance(param, click.Option) or param.hidden:
                continue
            name = param.opts[0][2:].replace("-", "_")
            if param.name in SPEC_KEYS:
                assert name == param.name, (command, param.opts, param.name)
            else:
                assert name not in keys, (command, param.opts)     # a key's flag feeds that key
    assert set(SPEC_KEYS) <= keys
    assert set(FLAG_ALIASES.values()) <= set(SPEC_KEYS)


def test_new_and_old_flag_spellings(cli, tmp_path):
    catalog = tmp_path / "models.toml"
    catalog.write_text('[models.house-model-1]\nlike = "claude-haiku-4-5"\nprices = {input = 1.0, output = 2.0}\n',
                       encoding="utf-8")
    job = write_job(tmp_path, 'prompt = "{{ text }}"\n')
    for flag in ("--models-file", "--models"):
        for stop in ("--stop-sequences", "--stop-sequence"):
            params = first_request(cli, job, flag, catalog, "--model", "house-model-1", stop, "END", stop, "STOP")
            assert params["model"] == "house-model-1" and params["stop_sequences"] == ["END", "STOP"]
    line = one_error_line(cli("validate", job, "--models-file", catalog, "--models", catalog))
    assert "--models-file" in line


def test_allow_unknown_model_as_a_job_key(cli, tmp_path):
    job = write_job(tmp_path, 'prompt = "{{ text }}"\n')
    line = one_error_line(cli("validate", job, "--model", "claude-nonexistent-9"))
    assert "unknown model" in line
    assert first_request(cli, job, "--model", "claude-nonexistent-9", "--allow-unknown-model")["model"] \
        == "claude-nonexistent-9"
    job = write_job(tmp_path, 'prompt = "{{ text }}"\nallow_unknown_model = true\n', "job2.toml")
    assert first_request(cli, job, "--model", "claude-nonexistent-9")["model"] == "claude-nonexistent-9"


# ---- --emulator and the state file ---------------------------------------------------------------

def test_emulator_state_from_the_job_file_or_flag_else_its_own(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    job = write_job(tmp_path, 'prompt = "{{ text }}"\nstate = "kept/job-state.sqlite"\n')
    r = cli("estimate", job, "--emulator")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "kept" / "job-state.sqlite").exists()
    assert "recorded in" in r.output                               # says where the emulator's replies go
    r = cli("estimate", job, "--emulator", "--state", tmp_path / "flag.sqlite")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "flag.sqlite").exists()
    assert not list(tmp_path.rglob("batchrun-*state.sqlite"))
    job = write_job(tmp_path, 'prompt = "{{ text }}"\n', "job2.toml")
    r = cli("estimate", job, "--emulator")
    assert r.exit_code == 0, r.output
    assert [p.name for p in tmp_path.rglob("batchrun-*state.sqlite")] == ["batchrun-emulator-state.sqlite"]
