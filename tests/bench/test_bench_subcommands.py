"""`python -m dsjax.bench engine|kernels|transfer|profile ...`: the micro-benchmarks are reached
through the serving benchmark's command line, which hands them the rest of argv, imports them
only when asked, and still routes every other first word to the load generator's parser."""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from dsjax.bench import cli
from dsjax.bench.cli import main

REPO = Path(__file__).resolve().parents[2]

# Each command's --help: text only that benchmark's parser prints (flags, choices, prog).
HELP_MARKERS = {
    "engine": ("--reps", "--only", "interference", "--dtype"),
    "kernels": ("--lower-only", "--max-kv-gib", "--max-reference-gib", "{decode,prefill,both}"),
    "transfer": ("usage: python -m dsjax.bench transfer", "--chunk-mib", "--e2e-requests", "--model-shape"),
    "profile": ("usage: python -m dsjax.plan profile", "--kv-budget-gib", "--tp", "--block-size"),
}


@pytest.fixture(autouse=True)
def _restore_xla_flags(monkeypatch):
    # engine_bench adds to XLA_FLAGS at import; keep the rest of the session's environment as it was.
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.mark.parametrize("command", sorted(HELP_MARKERS))
def test_forwarded_help_is_the_benchmarks_own(command, capsys):
    code, out, err = _run([command, "--help"], capsys)
    assert code == 0, err
    for marker in HELP_MARKERS[command]:
        assert marker in out, (command, marker)
    assert "--target" not in out and "--ttft" not in out  # not the load generator's parser
    others = {m for c, ms in HELP_MARKERS.items() if c != command for m in ms if m.startswith("usage:")}
    assert not any(m in out for m in others)


def test_forwarded_bad_flag_is_reported_by_the_benchmark(capsys):
    code, _, err = _run(["kernels", "--quick", "--bogus"], capsys)
    assert code == 2
    assert "unrecognized arguments: --bogus" in err and "--lower-only" in err


def test_top_level_help_lists_every_command_on_its_own_line(capsys):
    code, out, _ = _run(["--help"], capsys)
    assert code == 0 and "--target" in out
    lines = out.splitlines()
    for command in ("compare", "report", "fidelity", "engine", "kernels", "transfer", "profile"):
        assert sum(line.split()[:1] == [command] for line in lines) == 1, command
    for command in ("engine", "kernels", "transfer", "profile"):
        assert f"python -m dsjax.bench {command}" in cli.__doc__


def test_unknown_first_word_still_goes_to_the_run_parser(capsys):
    code, _, err = _run(["bogus", "--rates", "1"], capsys)
    assert code == 2
    assert "python -m dsjax.bench: error:" in err and "--target" in err
    # a command name anywhere but first is an argument of the default form, not a command
    code, _, err = _run(["--target", "localhost:1", "--rates", "1", "--ttft", "1", "--tpot", "1", "engine"], capsys)
    assert code == 2 and "unrecognized arguments: engine" in err


@pytest.mark.parametrize("returned, expected", [(None, 0), (0, 0), (3, 3)])
def test_exit_code_and_argv_are_passed_through(monkeypatch, returned, expected):
    calls = []
    fake = types.ModuleType("_fake_micro_bench")
    fake.main = lambda argv=None: calls.append(argv) or returned
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setitem(cli.FORWARDED, "engine", (fake.__name__, (), 1, "fake"))
    assert main(["engine", "--quick", "--reps", "2"]) == expected
    assert calls == [["--quick", "--reps", "2"]]


def test_profile_runs_plan_profile(monkeypatch):
    import dsjax.plan

    calls = []
    monkeypatch.setattr(dsjax.plan, "main", lambda argv=None: calls.append(argv) or 5)
    assert main(["profile", "--model", "tiny-llama", "--quick"]) == 5
    assert calls == [["profile", "--model", "tiny-llama", "--quick"]]


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_importing_the_cli_pulls_in_no_jax_matplotlib_or_grpc():
    r = _python("-c", "import sys, dsjax.bench.cli; print([m for m in ('jax', 'matplotlib', 'grpc') if m in sys.modules])")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_module_entry_point_forwards_and_exits_with_the_code():
    r = _python("-m", "dsjax.bench", "transfer", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: python -m dsjax.bench transfer") and "--chunk-mib" in r.stdout
    r = _python("-m", "dsjax.bench", "transfer", "--tokens", "many")
    assert r.returncode == 2 and "--tokens: invalid int value: 'many'" in r.stderr
