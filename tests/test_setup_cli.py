"""``era setup``: live progress on stderr, the outcome on stdout, exit codes, --list.
Commands only (no registry): the sandbox runs them with network, but they use none."""

from __future__ import annotations

import argparse
import json
import secrets
import shutil

import pytest

from era_kernel.setup.cli import add_setup_parser

from .conftest import short_tmpdir


@pytest.fixture
def era_env(monkeypatch):
    root = short_tmpdir("ecl")
    monkeypatch.setenv("ERA_DATA_DIR", str(root / "data"))
    monkeypatch.setenv("ERA_RUNTIME_DIR", str(root / "rt"))
    monkeypatch.setenv("ERA_WORKSPACE_URL", f"file://{root / 'store'}")
    monkeypatch.setenv("ERA_PROVISIONER", "local")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def era(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="era")
    add_setup_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_setup_shows_progress_and_tries_commands_in_a_scratch_sandbox(era_env, capsys):
    token = secrets.token_hex(4)
    assert era("setup", "-c", f"echo hello-{token} > made.txt; cat made.txt", "-c", "echo second; ls -A") == 0
    out, err = capsys.readouterr()
    assert f"[1/2] $ echo hello-{token}" in err and f"hello-{token}" in err.splitlines()[1]
    assert "[2/2] $ echo second; ls -A" in err and "made.txt" in err  # one workspace for both commands
    assert out.startswith("completed in ") and "no package environment; 2 command(s) ran" in out
    assert not list((era_env / "data" / "scratch").iterdir()), "the scratch sandbox is thrown away"

    assert era("setup", "-c", "echo again", "--json") == 0
    out, _ = capsys.readouterr()
    doc = json.loads(out)
    assert doc["setup_status"] == "completed" and doc["setup_result"]["env"] is None
    assert doc["setup_result"]["commands_run"] == ["echo again"] and doc["setup_result"]["stdout"] == "again\n"

    assert era("setup", "--list") == 0  # no environment was made: commands are not part of one
    out, _ = capsys.readouterr()
    assert out.splitlines()[1:] == []


def test_setup_failure_and_bad_input_exit_codes(era_env, capsys):
    assert era("setup", "-q", "-c", "echo 'no such thing' >&2; exit 7") == 1
    out, err = capsys.readouterr()
    assert out == "" and "exit 7" in err and "no such thing" in err
    assert era("setup", "--pip=--index-url=https://evil.example") == 2
    _, err = capsys.readouterr()
    assert "setup.pip[0]" in err and "starts with '-'" in err
    assert era("setup") == 2
    _, err = capsys.readouterr()
    assert "nothing to do" in err
