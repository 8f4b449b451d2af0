"""The run folder, logs/<run>/: its lock, its checkpoints (saved atomically with a sha256, checked on load, a bad
one skipped for the one before), moving an old run aside, and the checks that a resumed run is the same run (its
settings, its data). Also the one path from a checkpoint file back to a model: load_model for hellaswag.py and
sample.py, model_from_config (the model its config builds) for gpt2/ema.py."""

import fcntl
import glob
import os
import random
import socket
import time

import numpy as np
import torch

from gpt2.config import MODEL_FIELDS, RESUME_MUST_MATCH, TrainConfig, current_value
from gpt2.dataloader import read_manifest, sha256_file, shards_identity
from gpt2.models import build_model
from gpt2.runtime import (
    Sha256Writer,
    atomic_write,
    load_torch_file,
    print0,
    remove_stale_temps,
)
from model import GPT, GPTConfig

# ---------------------------------------------------------------------- checkpoints


def checkpoint_paths(run_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "ckpt_*.pt")))


def save_checkpoint(run_dir: str, state: dict, keep: int):
    """Atomic: write a temp file, then rename. A crash mid-write leaves the previous checkpoints intact. Its sha256,
    hashed while writing, goes beside it (`sha256sum -c` reads it) before the rename, so a checkpoint without one
    predates checksums. Rank 0 calls it; the others wait at a barrier (train_gpt2's Trainer.save_if_due)."""
    path = os.path.join(run_dir, f"ckpt_{state['step']:07d}.pt")
    with atomic_write(path) as f:  # a full disk raises DiskFullError (train_gpt2.py turns it into one line)
        writer = Sha256Writer(f)
        torch.save(state, writer)  # the same bytes as into f, hashed on the way
        with atomic_write(path + ".sha256", "w") as s:
            s.write(f"{writer.hexdigest()}  {os.path.basename(path)}\n")
    # later-step checkpoints belong to a timeline abandoned by `--resume earlier.pt`: auto-resume must not pick them
    newer = [p for p in checkpoint_paths(run_dir) if p > path]
    older = [p for p in checkpoint_paths(run_dir) if p <= path]
    for old in newer + (older[:-keep] if keep > 0 else []):
        os.remove(old)
        if os.path.exists(old + ".sha256"):
            os.remove(old + ".sha256")
    return path


class BadCheckpoint(ValueError):
    pass


_warned_unchecked = False


def check_sha256(path: str) -> bool:
    """Whether path has a .sha256 beside it (saved with checksums); BadCheckpoint if the file does not match it."""
    if not os.path.exists(path + ".sha256"):
        return False
    with open(path + ".sha256") as f:
        expected = f.read().split()[:1]
    if [sha256_file(path)] != expected:
        raise BadCheckpoint(f"{path} does not match its sha256 in {path}.sha256 (truncated or corrupted)")
    return True


# what a resume reads back from a checkpoint (save_if_due in train_gpt2.py writes them)
RESUME_KEYS = ("model", "optimizers", "step", "loader", "rng", "elapsed", "evaluated", "config")


def load_checkpoint(path: str) -> dict:
    """torch.load, after checking the file against its .sha256; a file with none predates checksums (warned once).
    BadCheckpoint for a file that is not a training checkpoint (e.g. a model ema.py wrote)."""
    global _warned_unchecked
    if not check_sha256(path) and not _warned_unchecked:
        _warned_unchecked = True
        print0(f"warning: {path} has no .sha256 beside it (saved before checksums): loading it unchecked")
    try:
        ckpt = load_torch_file(path)
    except ValueError as e:
        raise BadCheckpoint(str(e)) from None
    if missing := [k for k in RESUME_KEYS if not isinstance(ckpt, dict) or k not in ckpt]:
        raise BadCheckpoint(f"{path} is not a training checkpoint of train_gpt2.py (it lacks {missing}): a model "
                            "alone, e.g. one ema.py wrote, cannot be resumed")
    return ckpt


def load_resume_checkpoint(cfg: TrainConfig, run_dir: str) -> tuple[str | None, dict | None]:
    """The checkpoint to resume from and its contents: --resume path, or the newest good one of this run (a bad
    one is named and skipped: keep_checkpoints >= 2 keeps a fallback), or none."""
    if cfg.resume == "never":
        return None, None
    if cfg.resume != "auto":
        if not os.path.isfile(cfg.resume):
            raise SystemExit(f"--resume {cfg.resume}: no such checkpoint file")
        try:
            return cfg.resume, load_checkpoint(cfg.resume)
        except BadCheckpoint as e:
            raise SystemExit(f"--resume {cfg.resume}: {e}\npass another checkpoint, or --resume auto") from None
    paths = checkpoint_paths(run_dir)
    for path in reversed(paths):
        try:
            return path, load_checkpoint(path)
        except BadCheckpoint as e:
            print0(f"skipping a bad checkpoint: {e}")
    if paths:
        raise SystemExit(f"no good checkpoint in {run_dir} (all {len(paths)} are bad, see above): resume from "
                         "another with --resume PATH, or start over with --resume never (moves this run aside)")
    return None, None


# ---------------------------------------------------------------------- the run folder


def holds_run(run_dir: str) -> bool:
    metrics = os.path.join(run_dir, "metrics.jsonl")
    return bool(checkpoint_paths(run_dir)) or (os.path.exists(metrics) and os.path.getsize(metrics) > 0)


def move_run_aside(run_dir: str) -> str:
    """Starting over in a folder that holds a run: its files go to <run>.old-<time>/ (the lock stays), so two
    runs' metrics are never merged and no checkpoint of the old run is deleted."""
    aside = f"{os.path.normpath(run_dir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    os.makedirs(aside)
    for name in os.listdir(run_dir):
        if name != "lock":
            os.replace(os.path.join(run_dir, name), os.path.join(aside, name))
    return aside


class RunLock:
    """One trainer per run folder: rank 0 holds an flock on <run>/lock for the run's life. The OS releases it when
    the process dies, so a crash never leaves the folder locked; the file names the holder for the message."""

    held = {}  # path -> file: a lock this process still holds from a train() that raised (tests call main() again)

    def __init__(self, run_dir: str):
        path = os.path.realpath(os.path.join(run_dir, "lock"))
        if path in RunLock.held:
            RunLock.held.pop(path).close()
        self.file = open(path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise SystemExit(f"{run_dir} is in use by another trainer ({holder}): wait for it to finish, stop it, "
                             "or train this one under another --run-name") from None
        self.file.truncate(0)
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()
        RunLock.held[path] = self.file

    def release(self):
        RunLock.held.pop(os.path.realpath(self.file.name), None)
        self.file.close()


def open_run_dir(cfg: TrainConfig, run_dir: str, master: bool) -> RunLock | None:
    """Rank 0 locks the run folder, removes temp files of crashed saves, and moves an old run aside when this one
    starts over (--resume never, or a run that never saved a checkpoint)."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except (FileExistsError, NotADirectoryError, PermissionError) as e:  # a file on the path, or no write access
        raise SystemExit(f"cannot create the run folder {run_dir} ({e.strerror}): pass a --log-dir (and --run-name) "
                         "that names a folder you can write, not a file") from None
    if not master:
        return None
    lock = RunLock(run_dir)
    remove_stale_temps(run_dir)
    starting_over = cfg.resume == "never" or (cfg.resume == "auto" and not checkpoint_paths(run_dir))
    if starting_over and holds_run(run_dir):
        aside = move_run_aside(run_dir)
        print0(f"{run_dir} holds an earlier run, which this one does not continue: moved it to {aside}")
    return lock


# ---------------------------------------------------------------------- what a resumed run restores and checks


def rng_state() -> dict:
    # numpy's key array travels as a tensor so that checkpoints load with torch.load(weights_only=True)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(), "numpy": (name, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def data_identity(data_dir: str) -> str:
    """A hash over the manifest's shard list (file names and sha256s): the same folder rebuilt from another
    source, or with other settings, gets another identity."""
    return shards_identity(read_manifest(data_dir)["shards"])


def check_resume_data(ckpt: dict, data_id: str, path: str, data_dir: str):
    # checkpoints saved before data identities were recorded cannot be checked
    if ckpt.get("data_identity", data_id) != data_id:
        raise SystemExit(f"cannot resume from {path}: the shards in {data_dir} are not the ones this run trained on "
                         "(the folder was rebuilt from another source or with other settings). Point --data-dir at "
                         "the original shards, or start a new run with --run-name NAME.")


def check_resume_config(cfg: TrainConfig, saved: dict, path: str):
    # a setting missing from an older checkpoint did not exist then: the run had it at its default (off); an older
    # value of a setting reads as today's (current_value)
    defaults = TrainConfig()
    saved_model = saved_model_config(saved.get("model", saved))  # older checkpoints kept n_layer etc. at the top level
    pairs = [(k, current_value(k, saved.get(k, getattr(defaults, k))), getattr(cfg, k)) for k in RESUME_MUST_MATCH]
    pairs += [(f.name, saved_model.get(f.name, getattr(defaults.model, f.name)), getattr(cfg.model, f.name))
              for f in MODEL_FIELDS]
    diff = [f"--{k.replace('_', '-')}: checkpoint {old!r}, now {new!r}" for k, old, new in pairs
            if old != new and not (k == "data_dir" and os.path.realpath(old) == os.path.realpath(new))]
    if diff:
        raise SystemExit(f"cannot resume from {path}: the run's settings changed\n  " + "\n  ".join(diff)
                         + "\nPass the original values, or start a new run with --run-name NAME, or start over under "
                         "this name with --resume never (moves the old run's files aside to <run>.old-<time>/).")


# ---------------------------------------------------------------------- a checkpoint back into a model


def saved_model_config(model_config: dict) -> dict:
    """A saved model config as this code reads it: an edm2 run saved before edm2_storage existed stored rows."""
    if model_config.get("mode") == "edm2" and "edm2_storage" not in model_config:
        return {**model_config, "edm2_storage": "rows"}
    return model_config


def model_from_config(model_config: dict) -> GPT:
    """A freshly initialized model of the class and shape a saved 'model_config' names (any preset, switch or mode)."""
    return build_model(GPTConfig(**saved_model_config(model_config)))


def load_model(path: str) -> GPT:
    """The model saved in a checkpoint file, on the CPU, checked against its .sha256 as a resume checks it. A
    missing file raises FileNotFoundError, another kind of file or a corrupted one ValueError; both name the path."""
    if os.path.isdir(path):  # a run folder: name the checkpoint to pass instead
        ckpts = checkpoint_paths(path)
        use = (f"e.g. its latest, {ckpts[-1]}" if ckpts
               else "it holds none (train_gpt2.py writes logs/<run>/ckpt_<step>.pt)")
        raise IsADirectoryError(f"{path} is a folder: pass one checkpoint file, {use}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file (train_gpt2.py writes logs/<run>/ckpt_<step>.pt)")
    try:
        check_sha256(path)  # a model exported by ema.py has no .sha256: loaded as it is
    except BadCheckpoint as e:
        name = os.path.basename(path)
        earlier = [p for p in checkpoint_paths(os.path.dirname(path)) if os.path.basename(p) < name]
        use = f"use the previous checkpoint, {earlier[-1]}" if earlier else "use another checkpoint of the run"
        raise BadCheckpoint(f"{e}: {use}, or copy this one again if it came from elsewhere") from None
    ckpt = load_torch_file(path)  # names a file that is not a checkpoint
    if not (isinstance(ckpt, dict) and "model" in ckpt and "model_config" in ckpt):  # e.g. a bare tensor or list
        raise ValueError(f"{path} is not a training checkpoint: expected keys 'model' and 'model_config'")
    state, config = ckpt["model"], ckpt["model_config"]
    model = model_from_config(config)
    # a torch.compile'd model's state_dict has every key under '_orig_mod.'
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state.items()})
    return model
