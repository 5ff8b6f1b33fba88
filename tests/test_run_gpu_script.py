"""``benchmarks/run_gpu.sh`` runs only where a GPU is lent, in one time-capped go: every
command in it must parse here, where it can be checked, and the parts' time caps must
fit the total the script promises."""
from __future__ import annotations

import functools
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "run_gpu.sh"
# What the script's variables hold on the GPU machine (any value that parses will do).
ENVIRONMENT = {"OUT": "runs/gpu", "DATA": "data/bsds500", "KSTAR_PROCESSES": "8", "LIMIT": "50",
               "repro": "/tmp/repro", "PWD": "."}
SHELL_OPERATORS = ("2>&1", "2>>", ">", "|", ";", "&&")


def script_text() -> str:
    """The script with its comments dropped, continued lines joined and runs of blanks
    made one space."""
    lines = [line for line in SCRIPT.read_text().splitlines() if not line.lstrip().startswith("#")]
    return re.sub(r"[ \t]+", " ", "\n".join(lines).replace("\\\n", " "))


def expand(text: str, variables: dict) -> str:
    text = re.sub(r"\$\{(\w+):-[^}]*\}", lambda m: variables.get(m[1], m[0]), text)
    text = re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m[1], m[0]), text)
    return text


@functools.cache
def commands() -> list[tuple[str, list[str]]]:
    """(script or "pytest", its arguments) of every python command the script runs."""
    text = script_text()
    variables = dict(ENVIRONMENT)
    for name, value in re.findall(r'^(\w+)="([^"]*)"$', text, re.M):  # e.g. bench="python ..."
        variables[name] = expand(value, variables)
    found = []
    for line in expand(text, variables).splitlines():
        if re.match(r"\s*\w+=", line):  # an assignment, not a command
            continue
        for m in re.finditer(r"python (?:benchmarks/(\w+)\.py|-m (pytest))((?: (?!(?:2>&1|2>>|>|\||;|&&)(?: |$))\S+)*)",
                             line):
            found.append((m[1] or m[2], shlex.split(m[3])))
    return found


def test_the_script_runs_these_commands():
    names = [name for name, _ in commands()]
    # A pattern that stopped matching would make the checks below vacuous.
    for name in ("pytest", "bench_speed", "bench_conv", "reproduce_bsds500", "speed_tables"):
        assert name in names, name
    assert names.count("bench_speed") >= 8


@pytest.mark.parametrize("index", range(len(commands())))
def test_every_command_parses(index):
    name, argv = commands()[index]
    sys.path.insert(0, str(REPO / "benchmarks"))
    if name == "pytest":
        # The test files exist and each -k expression selects tests in them.
        files = [a for a in argv if a.endswith(".py")]
        assert files and all((REPO / f).is_file() for f in files), argv
        if "-k" in argv:  # the expression selects at least one test, as pytest collects them
            expr = argv[argv.index("-k") + 1]
            done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                   *files, "-k", expr], cwd=REPO, capture_output=True, text=True)
            selected = [line for line in done.stdout.splitlines() if "::" in line]
            assert done.returncode == 0 and selected, (expr, done.stdout[-500:])
        return
    module = importlib.import_module(name)
    if name == "reproduce_bsds500":
        module.parse_args(argv)
    else:
        module.build_parser().parse_args(argv)


def test_the_caps_fit_the_promised_total():
    text = script_text()
    default_part = text.split('if [ "$EXTRA" = 1 ]')[0]
    caps = [int(c) for c in re.findall(r"\btimeout (\d+)", default_part)]
    promised = re.search(r"at most about ([\d.]+) minutes", SCRIPT.read_text())
    assert caps and promised
    assert sum(caps) <= float(promised[1]) * 60, (caps, sum(caps))
