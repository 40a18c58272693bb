"""A training run's checkpoints in its out_dir: how trainer.py commits, prunes and picks them for --resume.

    out_dir/step_00001000/   model/ (a checkpoint folder), state/ (meta.json, rng_rank*.pt, optimizer state)
                             and COMPLETE, written last: every file of the checkpoint with its size

save     rank 0 makes step_N.tmp/, every rank writes its files into it, and after a barrier rank 0 writes
         COMPLETE and renames step_N.tmp to step_N: a folder under a final name is whole, a crash leaves
         only step_N.tmp/ (removed by this run's next save of that step).
prune    (--keep_last) an old step_N is renamed to step_N.pruned before anything in it is deleted: a kill
         mid-delete leaves step_N.pruned (removed at the next prune), never a half-deleted step_N.
resume   the newest step_N whose COMPLETE lists files that are all there with their sizes, whose meta.json
         reads and whose weights load into this run's model; each one passed over is named with the reason.
         A step_N without COMPLETE written before the marker existed (its meta.json has no "format") is
         accepted when its files load.
out_dir  a run does not start in an out_dir that holds another run's checkpoints or model without --resume,
         and deletes nothing there but its own step_N.tmp / .pruned and the checkpoints --keep_last drops.
"""
import json
import os
import re
import shutil

from checkpoint import atomic_write, write_json

MARKER = "COMPLETE"
FORMAT = 2  # state/meta.json "format": the checkpoint carries a COMPLETE marker
STEP_NAME = re.compile(r"step_\d+$")
MODEL_FILES = ("config.json", "model.safetensors", "adapter_config.json", "adapter_model.safetensors")
META_KEYS = ("step", "tokens_seen", "skipped_steps", "rows_per_step", "world_size")


def checkpoint_dirs(out_dir):
    """Checkpoints under their final names (step_N, not step_N.tmp / step_N.pruned), oldest first."""
    if not os.path.isdir(out_dir):
        return []
    return [os.path.join(out_dir, n) for n in sorted(os.listdir(out_dir)) if STEP_NAME.match(n)]


def read_meta(ckpt) -> dict:
    """A checkpoint's state/meta.json: step, tokens seen, skipped steps, rows per step, world size, args.
    A ValueError says what is wrong with it."""
    path = os.path.join(ckpt, "state", "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"state/meta.json: {e.strerror if isinstance(e, OSError) else 'not JSON'}") from None
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"state/meta.json: no {', '.join(missing)}")
    return meta


def check_out_dir(out_dir, resume):
    """A run starts only where no other run lives: without --resume, an out_dir holding checkpoints or a model
    is refused; with --resume, one holding a model but no checkpoint to continue from."""
    names = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    steps = sorted(n for n in names if n.startswith("step_"))
    models = [n for n in MODEL_FILES if n in names]
    if not resume and (steps or models):
        found = f"checkpoints ({steps[-1]})" if steps else f"a model ({models[0]})"
        raise SystemExit(f"--out_dir {out_dir}: holds {found} of an earlier run; --resume True continues it, "
                         "or give a new --out_dir (nothing there is deleted)")
    if resume and models and not steps:
        raise SystemExit(f"--out_dir {out_dir}: holds a model ({models[0]}) but no checkpoint to resume from; "
                         "give a new --out_dir")


# ----------------------------------------------------------------------------- writing (rank 0)

def begin_save(final) -> str:
    """A fresh step_N.tmp/ (with state/) for checkpoint `final`; a leftover of this run's interrupted save goes."""
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "state"))
    return tmp


def commit(tmp, final):
    """COMPLETE (every file with its size), then the rename: step_N appears whole or not at all. A step_N
    already there (one --resume passed over) is moved away, and deleted once the new one is in place."""
    files = {os.path.relpath(os.path.join(d, n), tmp): os.path.getsize(os.path.join(d, n))
             for d, _, names in os.walk(tmp) for n in names}
    atomic_write(os.path.join(tmp, MARKER), lambda p: write_json({"files": files}, p))
    old = final + ".pruned" if os.path.exists(final) else None
    if old:
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    if old:
        shutil.rmtree(old)


def prune(out_dir, keep_last):
    """Keep the newest keep_last checkpoints (0: all). Each one dropped leaves its final name (a rename) before
    its files are deleted; leftovers of an interrupted prune (step_N.pruned) go too."""
    old = checkpoint_dirs(out_dir)[:-keep_last] if keep_last > 0 else []
    for folder in old:
        shutil.rmtree(folder + ".pruned", ignore_errors=True)  # a leftover of the same name
        os.replace(folder, folder + ".pruned")
    for name in sorted(os.listdir(out_dir)):
        if name.startswith("step_") and name.endswith(".pruned"):
            shutil.rmtree(os.path.join(out_dir, name))


# ----------------------------------------------------------------------------- choosing one to resume

def incomplete(folder, state_file):
    """Why `folder` is not a complete checkpoint, or None. state_file: what state/ must hold for the backend
    (checked for checkpoints written before COMPLETE existed; a marker lists every file)."""
    marker = os.path.join(folder, MARKER)
    if not os.path.isfile(marker):
        try:
            legacy = "format" not in read_meta(folder)
        except ValueError as e:
            return f"no {MARKER} marker, {e}"
        if not legacy:
            return f"no {MARKER} marker (an interrupted save or prune)"
        return None if os.path.exists(os.path.join(folder, "state", state_file)) else f"no state/{state_file}"
    try:
        with open(marker) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MARKER} is not readable"
    for rel, size in files.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"{rel} is missing"
        if os.path.getsize(path) != size:
            return f"{rel} has {os.path.getsize(path)} bytes, {MARKER} says {size}"
    return None


def reason(e: BaseException) -> str:
    """One line of an exception: torch's load_state_dict puts the useful part ("size mismatch for ...") on
    a later line."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
    return next((x for x in lines if "mismatch" in x), lines[0])[:300]


def choose_checkpoint(out_dir, state_file, load_weights, say):
    """The newest checkpoint of out_dir that is complete, has a readable meta.json and whose model/ weights
    load_weights(folder) reads into the run's model (it raises otherwise); say(line) names each one passed
    over. Returns (folder, meta); None when out_dir holds no checkpoint; a SystemExit when none can be used."""
    dirs = checkpoint_dirs(out_dir)
    for folder in reversed(dirs):
        why = incomplete(folder, state_file)
        if why is None:
            try:
                meta = read_meta(folder)
                load_weights(os.path.join(folder, "model"))
            except (Exception, SystemExit) as e:  # a library error or our one-line SystemExit: skip it
                why = reason(e)
        if why is None:
            if not os.path.isfile(os.path.join(folder, MARKER)):
                say(f"resume: {folder} has no {MARKER} marker (written before markers): accepted, its files load")
            return folder, meta
        say(f"resume: skipped {folder}: {why}")
    if dirs:
        raise SystemExit(f"--resume: none of the {len(dirs)} checkpoints in {out_dir} can be resumed "
                         "(each is named above with the reason)")
    return None
