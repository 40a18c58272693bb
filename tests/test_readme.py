"""README.md stays a page for users: at most 250 lines, every file it cites exists, and every command in its
shell blocks runs as written: the script exists, answers `--help` (with its subcommand, if it has
subcommands), and knows every `--flag` the command passes, so renaming a flag without the README fails here.

No GPU needed: `--help` never touches one. Each distinct `python X.py [subcommand] --help` runs once, in its
own interpreter (sys.executable), a few at a time.
"""
import concurrent.futures
import functools
import glob
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
MAX_LINES = 250
SHELL_LANGS = {"bash", "sh", "shell"}
SKIPPED_PROGRAMS = {"pip", "pip3", "git", "cd"}
# folders of the repo: a path under one of them that the README names must exist (out/ and data/ are outputs)
REPO_DIRS = ("configs/", "scripts/", "figures/", "tests/", "benchmarks/", "docs/", ".ci/")
# flags whose value is a comma-separated list of names the --help text spells out (bench.py's entries)
LIST_FLAGS = {"--entries", "--sides"}


def readme_text() -> str:
    with open(README, encoding="utf-8") as f:
        return f.read()


def shell_commands(text: str) -> list[str]:
    """The commands of the ```bash / ```sh / ```shell blocks, `\\` continuations joined, comments and blank
    lines dropped (a `#` inside quotes stays: shlex decides what is a comment)."""
    commands, fence, pending = [], None, ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("```"):
            fence = None if fence is not None else (stripped[3:].strip().lower() or "text")
            continue
        if fence not in SHELL_LANGS:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        command, pending = pending + stripped, ""
        if shlex.split(command, comments=True):
            commands.append(command)
    return commands


def tokens_of(command: str) -> list[str]:
    words = shlex.split(command, comments=True)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):   # FOO=bar before the program
        words = words[1:]
    return words


def flags_in(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("--") and len(w) > 2]


def mentions(help_text: str, flag: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(flag) + r"(?![\w-])", help_text) is not None


@functools.lru_cache(maxsize=None)
def run_help(*argv: str) -> tuple[int, str]:
    """Exit status and output of `argv --help`, run from the repo root (cached: each help runs once)."""
    p = subprocess.run([*argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


def python_script(words: list[str]):
    """(script, its arguments) of a `python X.py ...`, `torchrun ... X.py ...` or `deepspeed ... X.py ...`
    command (launcher flags come before the script), else None."""
    program, rest = os.path.basename(words[0]), words[1:]
    if program in ("python", "python3") and rest and rest[0] != "-m":
        return rest[0], rest[1:]
    if program in ("torchrun", "deepspeed"):
        at = next((i for i, w in enumerate(rest) if w.endswith(".py")), None)
        return (rest[at], rest[at + 1:]) if at is not None else None
    return None


def prefetch_helps(commands: list[str]):
    """Run the --help of every script (then of every subcommand) the commands use, a few processes at a time,
    into run_help's cache."""
    scripts = {}
    for command in commands:
        found = python_script(tokens_of(command))
        if found and os.path.isfile(os.path.join(ROOT, found[0])):
            scripts.setdefault(found[0], []).append(found[1])
    workers = max(2, min(4, os.cpu_count() or 2))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        tops = dict(zip(scripts, pool.map(lambda s: run_help(sys.executable, s), scripts)))
        subs = {(s, w) for s, arg_lists in scripts.items() for args in arg_lists for w in args
                if w in subcommands(tops[s][1])}
        list(pool.map(lambda sw: run_help(sys.executable, *sw), sorted(subs)))


def subcommands(help_text: str) -> set[str]:
    """The subcommands argparse lists as `{a,b,c}` on a line of their own (the subparsers' choices)."""
    found = set()
    for group in re.findall(r"^\s+\{([\w,.-]+)\}", help_text, re.M):
        found.update(group.split(","))
    return found


def check_python_script(command: str, script: str, args: list[str]):
    path = os.path.join(ROOT, script)
    assert os.path.isfile(path), f"README runs {script}, which does not exist: {command}"
    rc, top_help = run_help(sys.executable, script)
    assert rc == 0, f"`python {script} --help` exited {rc}:\n{top_help[-3000:]}"
    choices = subcommands(top_help)
    sub_at = next((i for i, w in enumerate(args) if w in choices), None) if choices else None
    parts = [(args, top_help)]
    if sub_at is not None:
        sub = args[sub_at]
        rc, sub_help = run_help(sys.executable, script, sub)
        assert rc == 0, f"`python {script} {sub} --help` exited {rc}:\n{sub_help[-3000:]}"
        parts = [(args[:sub_at], top_help), (args[sub_at + 1:], sub_help)]
    elif choices:
        pytest.fail(f"{script} has subcommands {sorted(choices)}, but the README command names none: {command}")
    for words, help_text in parts:
        for flag in flags_in(words):
            assert mentions(help_text, flag), f"{flag} is not in the --help of {script}: {command}"
        for i, w in enumerate(words[:-1]):
            if w in LIST_FLAGS:
                squeezed = re.sub(r"\s+", "", help_text)   # argparse wraps long defaults mid-word
                for name in words[i + 1].split(","):
                    assert name in squeezed, f"{w} {name}: not a name the --help of {script} lists: {command}"


def check_run_sh(command: str, args: list[str]):
    p = subprocess.run(["bash", "run.sh", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"`bash run.sh --help` exited {p.returncode}:\n{p.stdout}{p.stderr}"
    usage = p.stdout
    for flag in flags_in(args):
        assert mentions(usage, flag), f"{flag} is not in run.sh's usage: {command}"
    if args and args[0] == "test":
        assert "run.sh test" in usage, f"run.sh's usage does not show its test mode: {command}"


def check_command(command: str):
    words = tokens_of(command)
    program, rest = os.path.basename(words[0]), words[1:]
    for w in rest:   # repo files passed as arguments (configs/ds_zero2.json, scripts/slurm_pretrain.sh)
        value = w.split("=", 1)[-1]
        if value.startswith(REPO_DIRS):
            assert glob.glob(os.path.join(ROOT, value)), f"README passes {value}, which does not exist: {command}"
    if program in SKIPPED_PROGRAMS:
        return
    if program in ("python", "python3") and rest[:1] == ["-m"]:
        rc, out = run_help(sys.executable, "-m", rest[1])
        assert rc == 0, f"`python -m {rest[1]} --help` exited {rc}:\n{out[-3000:]}"
        for flag in flags_in(rest[2:]):
            assert mentions(out, flag), f"{flag} is not in `python -m {rest[1]} --help`: {command}"
        return
    if program in ("python", "python3", "torchrun", "deepspeed"):
        found = python_script(words)
        assert found and found[0].endswith(".py"), f"a {program} command that runs no script: {command}"
        return check_python_script(command, *found)
    if program == "bash" and rest and rest[0] == "run.sh":
        return check_run_sh(command, rest[1:])
    if program in ("bash", "sbatch"):
        assert rest and os.path.isfile(os.path.join(ROOT, rest[0])), f"no such script: {command}"
        return
    pytest.fail(f"test_readme.py does not know how to check `{program}` commands: {command}")


def test_readme_at_most_250_lines():
    n = len(readme_text().splitlines())
    assert n <= MAX_LINES, f"README.md has {n} lines (at most {MAX_LINES}); history goes to docs/"


def test_readme_cites_existing_files():
    """Repo paths (configs/..., figures/..., docs/...) and the scripts it names (X.py, X.sh) exist."""
    text = readme_text()
    missing = []
    for path in re.findall(r"(?<![\w/.-])((?:%s)[\w*./-]*[\w*])" % "|".join(map(re.escape, REPO_DIRS)), text):
        if not glob.glob(os.path.join(ROOT, path)):
            missing.append(path)
    for name in re.findall(r"(?<![\w/.-])([A-Za-z_][\w-]*\.(?:py|sh))\b", text):
        if not os.path.isfile(os.path.join(ROOT, name)):
            missing.append(name)
    assert not missing, f"README.md cites files that do not exist: {sorted(set(missing))}"


def test_readme_has_commands():
    commands = shell_commands(readme_text())
    assert any(c.startswith("bash run.sh") for c in commands)
    assert sum(c.startswith(("python ", "torchrun ", "deepspeed ")) for c in commands) >= 10


COMMANDS = shell_commands(readme_text())


@pytest.fixture(scope="module")
def helps():
    prefetch_helps(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c[:80])
def test_readme_command_runs_as_written(command, helps):
    check_command(command)
