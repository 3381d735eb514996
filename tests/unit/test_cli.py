"""The `fusionrec` CLI: one registry, every command listed and each one's --help working."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[2]
EXPECTED = {"build", "eval", "run", "bench", "bench-batching", "loadtest", "recommend", "gpu-check",
            "export-events", "tokens", "bench-scale", "eval-seeds", "bench-hop"}


def test_registry_declares_each_command_once() -> None:
    names = [c.name for c in COMMANDS]
    assert sorted(names) == sorted(EXPECTED) and len(set(names)) == len(names)


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for spec in COMMANDS:
        assert f"    {spec.name} " in out or f"    {spec.name}\n" in out, spec.name


@pytest.mark.parametrize("spec", COMMANDS, ids=lambda c: c.name)
def test_each_command_help_exits_zero(spec, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([spec.name, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fusionrec {spec.name} ")
    module = spec.load()
    assert callable(module.add_arguments) and callable(module.run)
    assert module.__doc__.strip().splitlines()[0] in out   # the module's docstring is the description


def test_unknown_command_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-command"])
    assert exit_.value.code == 2
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err


def test_top_level_help_imports_no_command_module() -> None:
    """`fusionrec --help` stays fast: no tool module (and so no torch, faiss, tritonclient) is loaded."""
    code = ("import sys, contextlib, io\n"
            "from tools.cli import COMMANDS, main\n"
            "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['--help'])\n"
            "print(sorted(c.module for c in COMMANDS if c.module in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_python_dash_m_and_offline_main_work() -> None:
    cli = subprocess.run([sys.executable, "-m", "tools.cli", "recommend", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0 and "--target" in cli.stdout, cli.stderr
    offline = subprocess.run([sys.executable, "-m", "offline", "build", "--help"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert offline.returncode == 0 and "--max-items" in offline.stdout, offline.stderr


def test_export_events_joins_folders_and_refuses_a_missing_one(tmp_path, capsys):
    from gateway.event_log import Event, EventLog
    from tools.cli import main
    EventLog(tmp_path / "a").append([Event("u", "i", "click", 1_700_000_000.0)])
    EventLog(tmp_path / "b").append([Event("v", "j", "like", 1_700_000_001.0)])
    out = tmp_path / "data" / "interactions.csv"
    assert main(["export-events", "--event-log", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 3 and "2 events from 2 log folder(s)" in capsys.readouterr().out
    assert main(["export-events", "--event-log", str(tmp_path / "nope"), "--out", str(out)]) == 2
