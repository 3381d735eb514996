"""`fusionrec bench-hop` runs a real echo server in a child process, plaintext then mTLS, and writes
one row per mode (the figures are machine-dependent: only their presence and sign are checked)."""
import json

import pytest

from tools.cli import main


def test_bench_hop_writes_a_row_per_mode(tmp_path, capsys):
    out = tmp_path / "hop.json"
    assert main(["bench-hop", "--calls", "30", "--payload-bytes", "100", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["mode"] for r in rows] == ["plaintext", "mtls"]
    for row in rows:
        assert row["calls"] == 30 and row["payload_bytes"] == 100
        assert row["wall_ms"] > 0 and row["client_core_ms"] > 0 and row["server_core_ms"] >= 0
    printed = capsys.readouterr().out
    assert "plaintext" in printed and "mtls" in printed and str(out) in printed


def test_bench_hop_refuses_a_bad_count(tmp_path):
    with pytest.raises(SystemExit, match="--calls"):
        main(["bench-hop", "--calls", "0", "--out", str(tmp_path / "x.json")])
