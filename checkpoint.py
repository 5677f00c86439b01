"""The run folder OUT and what survives a crash: the lock and the checkpoints (the metrics log: logs.py).

- One trainer per OUT: an OS lock on OUT/.lock, held for the run's life, released by the kernel however the
  process ends. torchrun's workers die with their launcher (exit_with_parent), so none outlives a kill -9.
- A checkpoint is a folder OUT/checkpoints/step_N whose manifest.json, written last, lists every file with its
  size and sha256. A folder without a manifest, or whose files disagree with it, is not whole and is never
  resumed from: resume falls back to the newest whole one.
save_training() and load_training() are collective (every rank calls them: FSDP2 gathers each full state dict
to rank 0); everything else is plain files, called on rank 0.
"""
import ctypes
import datetime
import fcntl
import hashlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)

MANIFEST = "manifest.json"


def lock(out_dir):
    """Take an exclusive lock on OUT/.lock for the life of the process; return the open file (keep it open).
    Raises RuntimeError naming the holder (pid, host, start time, command) if another live process holds it.
    It is an OS lock (flock), so it dies with its process: a kill -9 leaves no stale lock behind."""
    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, ".lock"), "a+")  # not "w": truncating before we hold it would erase the holder
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process (that has not yet written its details)"  # just locked
        f.close()
        raise RuntimeError(f"{out_dir} is in use by {holder}; stop it or choose another --out") from None
    # Python opens files non-inheritable, so exec'd children do not hold the lock; forked ones share it until exit.
    f.truncate(0)
    command = shlex.join(sys.orig_argv).replace("\n", "\\n")  # one line, even for python -c '...'
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, running since {time.strftime('%Y-%m-%d %H:%M:%S')}: "
            f"{command}\n")
    f.flush()
    return f


def exit_with_parent():
    """Have the kernel SIGKILL this process when its parent dies (Linux); return whether that is now armed.
    torchrun starts its workers in their own sessions, so a kill -9 of the launcher would leave them running.
    Call it only in a process that has a launcher: one whose parent is already gone, or is init (pid 1), exits at
    once with status 1. The kernel ties the signal to the parent *thread* that started this process (torchrun
    starts workers from its main thread). A no-op (returns False) where prctl is unavailable (not Linux)."""
    parent = os.getppid()
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # the process's own symbols include libc's
    except (OSError, AttributeError):
        return False
    if prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
        return False
    # The parent may have died before the prctl call, and then no signal will ever come: check after arming.
    if os.getppid() != parent or parent == 1:
        print(f"pid {os.getpid()}: the process that started it is gone; exiting", file=sys.stderr, flush=True)
        os._exit(1)
    return True


def _hash(path, sync=False):
    """(size, sha256 hex) of a file, in one read; with sync, fsync it too (works on a read-only fd on Linux)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        if sync:
            os.fsync(f.fileno())
        return os.fstat(f.fileno()).st_size, h.hexdigest()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # makes the names in it (new files, a rename) durable, not just the files' contents
    os.close(fd)


def _write_synced(path, data):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save(final_dir, write_files, info=None):
    """Write a checkpoint at final_dir atomically: write_files(tmp_dir) writes the files, then this writes
    manifest.json (every file's relative path, size, sha256, and `info`) last, fsyncs, and renames tmp -> final.
    If anything fails or the machine dies before the rename, final_dir is untouched (absent, or the previous
    checkpoint at that path) and the leftover final_dir + ".tmp" is ignored by steps() and removed next time."""
    final_dir = os.path.normpath(final_dir)  # also takes a pathlib.Path, or a trailing slash
    tmp = final_dir + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # a stale one from an earlier crash
    os.makedirs(tmp)
    write_files(tmp)
    files = {}
    for dirpath, dirnames, filenames in os.walk(tmp):
        dirnames.sort()
        for name in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, name), tmp).replace(os.sep, "/")
            if rel != MANIFEST:
                size, sha = _hash(os.path.join(dirpath, name), sync=True)
                files[rel] = {"size": size, "sha256": sha}
        _fsync_dir(dirpath)
    _write_synced(os.path.join(tmp, MANIFEST), json.dumps({"files": files, "info": info or {}}, indent=1).encode())
    _fsync_dir(tmp)
    # os.replace cannot replace a non-empty folder. A crash between these two lines loses only this save's
    # step (the whole copy stays in tmp); latest() then falls back to the previous step.
    if os.path.exists(final_dir):
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)
    _fsync_dir(os.path.dirname(os.path.abspath(final_dir)))


def verify(ckpt_dir, hashes=True):
    """None if the checkpoint is whole, else a short reason ("optimizer.pt missing", "x: sha256 mismatch", ...).
    Whole: manifest.json is there and every file it lists exists with its size and (if hashes) its sha256."""
    path = os.path.join(ckpt_dir, MANIFEST)
    if not os.path.isfile(path):
        return "no manifest.json"
    try:
        with open(path) as f:
            files = json.load(f)["files"]
        files = {rel: (int(e["size"]), e["sha256"]) for rel, e in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return "manifest.json is unreadable"
    for rel, (size, _) in files.items():  # sizes first: cheap, and they catch a cut-off write
        p = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(p):
            return f"{rel} missing"
        if os.path.getsize(p) != size:
            return f"{rel}: {os.path.getsize(p)} bytes, manifest says {size}"
    for rel, (_, sha) in files.items() if hashes else ():
        if _hash(os.path.join(ckpt_dir, rel))[1] != sha:
            return f"{rel}: sha256 mismatch"
    return None


def steps(root):
    """[(N, path)] of the step_N folders in root, sorted by N; .tmp folders and anything else are skipped."""
    if not os.path.isdir(root):
        return []
    found = [(int(m[1]), os.path.join(root, name)) for name in os.listdir(root)
             if (m := re.fullmatch(r"step_(\d+)", name)) and os.path.isdir(os.path.join(root, name))]
    return sorted(found)


def latest(root, warn=print):
    """Path of the newest whole checkpoint in root, or None if none is whole.
    Each newer checkpoint that is not whole is reported once through warn, with its reason."""
    broken = []
    for _, d in reversed(steps(root)):
        reason = verify(d)
        if reason is None:
            for name, why in broken:
                warn(f"checkpoint {name} is not whole ({why}); falling back to {os.path.basename(d)}")
            return d
        broken.append((os.path.basename(d), reason))
    for name, why in broken:
        warn(f"checkpoint {name} is not whole ({why}); no whole checkpoint left")
    return None


def prune(root, keep):
    """Delete every checkpoint older than the newest `keep` whole ones (at least 1 is always kept), and stale
    step_N.tmp folders up to the newest whole step. Broken ones newer than those kept are left for inspection.
    Returns the deleted paths. Whole here means sizes match: re-hashing every kept checkpoint after each save
    would read gigabytes, and truncation is what a crash leaves."""
    kept = []
    for n, d in reversed(steps(root)):
        if verify(d, hashes=False) is None:
            kept.append(n)
            if len(kept) >= max(keep, 1):
                break
    if not kept:
        return []
    cutoff = kept[-1] if len(kept) >= max(keep, 1) else -1  # fewer whole ones than `keep`: delete no step_N
    gone = [d for n, d in steps(root) if n < cutoff]
    gone += [os.path.join(root, name) for name in os.listdir(root)
             if (m := re.fullmatch(r"step_(\d+)\.tmp", name)) and int(m[1]) <= kept[0]]  # no save is under way
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    return gone


# While rank 0 writes a checkpoint (or, at start-up, hashes the ones to resume from), the other ranks wait in a
# collective, and a 3B PPO checkpoint (policy, critic, both optimizers: ~75 GB) can take longer than NCCL's default
# timeout (10 minutes). Those collectives, and only those, run in a group of their own with this timeout
# (train.py's disk_waits): any other desync still shows within the backend's default.
SAVE_TIMEOUT = datetime.timedelta(hours=1)


def save_training(final_dir, trained, tokenizer, state, info, wait_group=None):
    """Collective: a checkpoint of the training at final_dir, written whole or not at all (save()): the policy as
    a transformers folder (model.safetensors, config, tokenizer), optimizer.pt, trainer_state.pt (`state`, each
    schedule, every rank's RNG), and any other trained model in a folder of its name with NAME_optimizer.pt (PPO's
    critic in critic/, PRIME's PRM in prm/). trained: train.py's [(model, optimizer, schedule, name)], the policy
    ("policy") first. info goes to the manifest (the run's flags). The other ranks wait for rank 0's writing in
    wait_group (one with SAVE_TIMEOUT; None: the default group).
    Writes nothing and returns False when any rank holds a weight that is not finite; True once written."""
    bad = sum(not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()  # this rank's shards
              for model, *_ in trained for p in model.parameters())
    bad = torch.tensor(float(bad), device=next(trained[0][0].parameters()).device)
    dist.all_reduce(bad)
    if bad.item():
        return False
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0 only, in CPU memory
    saved = [(get_model_state_dict(model, options=full), get_optimizer_state_dict(model, optim, options=full))
             for model, optim, *_ in trained]
    rngs = [None] * dist.get_world_size()
    dist.all_gather_object(rngs, rng_state())

    def write(tmp):
        for (sd, osd), (model, *_, name) in zip(saved, trained):
            folder, file = _places(tmp, name)
            model.save_pretrained(folder, state_dict=untied(model, sd))
            torch.save(osd, os.path.join(tmp, file))
        tokenizer.save_pretrained(tmp)
        torch.save({**state, "schedulers": [sched.state_dict() for model, optim, sched, name in trained],
                    "rng": rngs}, os.path.join(tmp, "trainer_state.pt"))

    if dist.get_rank() == 0:
        save(final_dir, write, info)
    dist.barrier(group=wait_group)  # the checkpoint exists for every rank once this returns
    return True


def untied(model, state_dict):
    """state_dict without the copies of tied weights (lm_head.weight where the embeddings are tied): one copy on
    disk, as in the model's source; from_pretrained and vLLM tie them again. The gathered full state dict holds
    each key as its own tensor, so save_pretrained cannot see that they are one parameter and would write both."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if not getattr(config, "tie_word_embeddings", False):
        return state_dict
    tied = getattr(model, "_tied_weights_keys", None) or {}  # transformers 5: {tied key: the key it shares}
    return {k: v for k, v in state_dict.items() if k not in tied or tied[k] not in state_dict}


def load_training(ckpt_dir, trained):
    """Collective: load what save_training wrote into the optimizers and schedules of `trained` (the models were
    built from the checkpoint's folders) and restore this rank's RNG. Returns the saved `state`. weights_only:
    a checkpoint is data, never code that runs when it is loaded."""
    for model, optim, sched, name in trained:
        file = _places(ckpt_dir, name)[1]
        # Rank 0 reads the full state (memory-mapped) and sends each tensor in turn; every rank keeps its shard.
        # (Read on every rank, a 3B model's AdamW state is 25 GB of host memory per rank.)
        osd = torch.load(os.path.join(ckpt_dir, file), map_location="cpu", weights_only=True, mmap=True) \
            if dist.get_rank() == 0 else {}
        set_optimizer_state_dict(model, optim, osd, options=StateDictOptions(full_state_dict=True,
                                                                             broadcast_from_rank0=True))
    state = torch.load(os.path.join(ckpt_dir, "trainer_state.pt"), weights_only=True)
    for (model, optim, sched, name), sd in zip(trained, state["schedulers"]):
        sched.load_state_dict(sd)
    set_rng_state(state["rng"][dist.get_rank()])
    return state


def _places(root, name):
    """(the folder of its weights, the file of its optimizer state) of a trained model in a checkpoint: the
    policy's at the top, another's (the critic's, the PRM's) in a folder of its name."""
    return (root, "optimizer.pt") if name == "policy" else (os.path.join(root, name), f"{name}_optimizer.pt")


def rng_state():
    """The torch (and CUDA, when there is one), numpy and python `random` states as tensors and plain Python
    values, so that torch.load(path, weights_only=True) can load them."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),  # python's: (int, tuple of ints, float|None)
             "numpy": {"name": name, "key": torch.from_numpy(key.astype(np.int64)),  # weights_only refuses ndarrays
                       "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    """Restore what rng_state() returned: the next random numbers are those that followed it."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))  # the C code insists on a tuple
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def arg_differences(saved, now, keys):
    """["--flag: saved X, now Y"] for the keys (argparse dest names) whose values differ between two dicts."""
    def show(d, k):  # tuples as lists, so that args read back from JSON compare equal to argparse's
        return repr(list(d[k]) if isinstance(d[k], tuple) else d[k]) if k in d else "(not recorded)"
    return [f"--{k.replace('_', '-')}: saved {show(saved, k)}, now {show(now, k)}" for k in keys
            if show(saved, k) != show(now, k)]


def claim(out_dir, args, run_defining):
    """Rank 0 of train.py, before any model loads: lock OUT, and with args["resume"] pick the newest whole
    checkpoint, check it was made by the same run (the run_defining flags; args["force_resume"] overrides) and
    is not past args["steps"]. Returns (problem: one line or None, checkpoint folder or None, its step).
    The lock stays held while the process lives (the open file is kept in a module global)."""
    global _lock
    try:
        _lock = lock(out_dir)
    except RuntimeError as e:
        return str(e), None, 0
    if not args["resume"]:
        return None, None, 0
    root = os.path.join(out_dir, "checkpoints")
    found = latest(root, warn=lambda line: print(f"train.py: warning: {line}", flush=True))
    if found is None:
        return f"--resume: no whole checkpoint in {root}", None, 0
    info = read_info(found)
    differences = arg_differences(info["args"], args, run_defining)
    if differences and not args["force_resume"]:
        return (f"--resume: {found} belongs to another run ({'; '.join(differences)}); give the flags it was made "
                "with, or --force-resume"), None, 0
    if info["step"] > args["steps"]:
        return f"--resume: {found} is step {info['step']}, past --steps {args['steps']}", None, 0
    return None, found, info["step"]


def read_info(ckpt_dir):
    """The `info` that save() recorded in a checkpoint's manifest (train.py: the step and the run's flags)."""
    with open(os.path.join(ckpt_dir, MANIFEST)) as f:
        return json.load(f)["info"]


def model_problem(path):
    """None if path looks like a whole transformers model folder, else the reason, without loading anything:
    a config.json that parses, and every *.safetensors file with a readable header whose tensors end exactly
    at the end of the file (a truncated or corrupt download fails here in milliseconds, not after a load)."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            json.load(f)
    except FileNotFoundError:
        return "is not a model folder (no config.json there)"
    except (OSError, ValueError) as e:
        return f"has an unreadable config.json ({e})"
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            file = os.path.join(path, name)
            size = os.path.getsize(file)
            try:
                with open(file, "rb") as f:
                    n = int.from_bytes(f.read(8), "little")  # the format: header length, JSON header, tensor data
                    if not 2 <= n <= min(size - 8, 100 << 20):
                        raise ValueError("bad header length")
                    header = json.loads(f.read(n))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError) as e:
                return f"has a corrupt {name} (not a readable safetensors file: {e})"
            if 8 + n + end != size:
                return f"has a truncated or corrupt {name} ({size} bytes, its header says {8 + n + end})"
    return None
