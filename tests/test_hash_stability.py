"""The request hash is byte-identical to the one state files already in use hold (issue #17: the plan's
speed-ups must not change it, or answers already paid for would no longer be found again).

The expected values were computed for this job by the code before those speed-ups (main at 2796f61).
`--emulator` keys the endpoint as the built-in emulator whatever its port, so the hashes are fixed."""
from __future__ import annotations

import sqlite3

EXPECTED = {"A1": "a0c656e707dde7a5c0d5065a58fad02ea457d916dbf4e5d29aac3751d82610e8",
            "A2": "42d73ee8095e52138ef40da60f71bca7f1025a110adbdc051353659a9c4239f9",
            "A3": "25d38b4094fcd4b1ff3dc403d2aa112ab637a351fa77d578f8e55555ff528aa3"}


def test_request_hashes_are_the_ones_stored_before(cli, tmp_path):
    data = tmp_path / "in.csv"
    data.write_text('id,title,body\nA1,Zoë,"naïve café ✓, ""quoted""\nsecond line"\nA2,李雷,plain\nA3,,\n',
                    encoding="utf-8")
    state = tmp_path / "s.sqlite"
    r = cli("estimate", "--emulator", "--input", data, "--state", state, "--id-column", "id",
            "--prompt", "Review {{ title }}: {{ body }}", "--system", "Be brief.", "--max-tokens", "64")
    assert r.exit_code == 0, r.output
    with sqlite3.connect(state) as db:
        got = dict(db.execute("SELECT custom_id, params_hash FROM requests ORDER BY row_index"))
    assert got == EXPECTED


def test_the_row_parts_fast_canonical_json_is_the_encoders_text():
    """canonical_json writes the common row part ({"messages": [{"content", "role"}...]}) without the
    encoder: byte for byte the encoder's text, for every kind of string; any other shape goes to the encoder."""
    import json

    from batchrun.requests import canonical_json
    encoder = json.JSONEncoder(ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode
    texts = ["", "plain", 'naïve café ✓, "quoted"\nsecond line\t\\ \x00\x1f\x7f', "李雷 \u2028\u2029 \ud800 😀",
             "</script>", "x" * 5000]
    parts = [{"messages": [{"role": "user", "content": t}]} for t in texts]
    parts += [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                            {"role": "user", "content": "c"}]},
              {"messages": []},
              {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
              {"messages": [{"role": "user", "content": "x", "extra": 1}]},
              {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
              {"messages": [{"role": "user", "name": "x"}]},
              {"messages": [{"role": "user", "content": None}]}]
    for part in parts:
        assert canonical_json(part) == encoder(part)
