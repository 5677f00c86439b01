"""Crash safety of train.py, end to end: what survives a kill, one trainer per run folder, checkpoints that prove
they are whole, the non-finite guard, and bad input that fails in one line before any model loads.

- bad input (fast, a world of one): each case gives exactly one `train.py: error:` line naming the file, row or
  flag, within seconds, with nothing heavy written;
- resume guards (fast): flags that change what the run is, nothing left to do, a corrupt newest checkpoint (fall
  back to the previous whole one), no whole checkpoint at all, a second trainer on the same OUT;
- slow: SIGKILL of every process at chosen and random moments (among them between a step's log line and its
  checkpoint), resumed until done, equals an uninterrupted run line by line and weight by weight; a kill -9 of
  torchrun alone takes its workers down; a learning rate that blows the weights up is skipped, not applied.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import REPO, child_env, free_port, python, torchrun  # noqa: E402
from test_train import (CKPT, TRAIN, assert_clean_failure, assert_same_metrics, assert_same_weights,  # noqa: E402
                        checkpoints, flags, read_metrics)

sys.path.insert(0, REPO)
import checkpoint  # noqa: E402
import data  # noqa: E402


def good_data(path):
    tr, te = data.make_splits("countdown", 8, 4, seed=0, num_counts=(3,), num_range=(1, 20), target_range=(10, 50))
    data.write_rows(tr, os.path.join(path, "train.jsonl"))
    data.write_rows(te, os.path.join(path, "test.jsonl"))
    return path


def bad_data(path, case):
    """A data folder with one defect."""
    good_data(path)
    train = os.path.join(path, "train.jsonl")
    if case == "empty-train":
        open(train, "w").close()
    elif case == "empty-test":
        open(os.path.join(path, "test.jsonl"), "w").close()
    elif case == "jsonl-and-parquet":
        data.write_rows(data.load_rows(train), os.path.join(path, "train.parquet"))
    elif case == "nested-json":
        with open(train, "a") as f:
            f.write("[" * 100_000 + "]" * 100_000 + "\n")
    elif case == "invalid-utf8":
        with open(train, "ab") as f:
            f.write(b'{"data_source": "countdown\xff\xfe"}\n')
    return str(path)


@pytest.mark.parametrize("case, phrase", [
    ("empty-train", "train.jsonl: no rows"),
    ("empty-test", "test.jsonl: no rows"),
    ("jsonl-and-parquet", "keep one of them"),
    ("nested-json", "train.jsonl: line 9: invalid JSON: nested too deeply"),
    ("invalid-utf8", "train.jsonl: line 9: invalid UTF-8"),
])
def test_bad_data_file_is_one_line(case, phrase, tmp_path):
    out = tmp_path / "out"
    res = python(TRAIN, flags(out=out, data=bad_data(tmp_path / "data", case)), timeout=120)
    assert_clean_failure(res, phrase, out)


def test_bad_flags_are_one_line(tmp_path):
    """argparse's own checks, in one line each (no usage screen), before anything is read or written."""
    for extra, phrase in ((["--lr", "-1"], "argument --lr: -1: must be > 0 (or auto)"),
                          (["--top-p", "0"], "argument --top-p: 0: must be > 0 and <= 1"),
                          (["--group-size", "0"], "argument --group-size: 0: must be >= 1"),
                          (["--kl-coef", "x"], "argument --kl-coef: invalid float value: 'x'"),
                          (["--kl-ctrl", "adaptive"], "--kl-ctrl adaptive steers PPO's KL reward")):
        out = tmp_path / "out"
        res = python(TRAIN, flags(out=out) + extra, timeout=120)
        assert_clean_failure(res, phrase, out)
        assert "usage:" not in res.stderr


def test_out_under_a_regular_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    res = python(TRAIN, flags(out=tmp_path / "file" / "run"), timeout=120)
    assert_clean_failure(res, "cannot make the folder (Not a directory)", tmp_path / "file" / "run")


def test_corrupt_model_is_one_line(tmp_path):
    """A model folder whose safetensors file was cut short (a broken download): found from the file's header in
    milliseconds, not after a load."""
    import pretrain
    model = tmp_path / "model"
    pretrain.build_tiny_model(str(model))
    weights = model / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size - 1000)
    res = python(TRAIN, flags(out=tmp_path / "out", model=model), timeout=120)
    assert_clean_failure(res, f"has a truncated or corrupt model.safetensors ({size - 1000} bytes", tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------
# resume guards and the lock: a world of one with the hf engine, 2 steps with a checkpoint after each
@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_steps")
    res = python(TRAIN, flags(out=out, steps=2, rollout="hf", eval_every=0, batch_prompts=2, **CKPT), timeout=300)
    assert res.returncode == 0, res.tail()
    assert checkpoints(out) == ["step_1", "step_2"]
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def resume(out, timeout=120, **kw):
    kw = {**dict(steps=2, rollout="hf", eval_every=0, batch_prompts=2, resume=True, **CKPT), **kw}
    return python(TRAIN, flags(out=out, **kw), timeout=timeout)


def one_error(res):
    errors = [ln for ln in res.stderr.splitlines() if "train.py: error:" in ln]
    assert res.returncode != 0 and len(errors) == 1, res.tail()
    return errors[0]


def test_resume_refuses_flags_that_change_the_run(two_steps, tmp_path):
    out = copy_run(two_steps, tmp_path / "run")
    line = one_error(resume(out, algo="ppo", seed=3))
    assert "belongs to another run (--algo: saved 'grpo', now 'ppo'; --seed: saved 0, now 3)" in line, line
    assert "--force-resume" in line
    assert checkpoints(out) == ["step_1", "step_2"]


def test_resume_with_nothing_left_to_do_says_so(two_steps, tmp_path):
    out = copy_run(two_steps, tmp_path / "run")
    res = resume(out)
    assert res.returncode == 0 and "step 2 of --steps 2: nothing left to do" in res.stdout, res.tail()
    line = one_error(resume(out, steps=1))
    assert "step_2 is step 2, past --steps 1" in line, line


def test_resume_falls_back_from_a_corrupt_newest_checkpoint(two_steps, tmp_path):
    """A truncated model.safetensors in step_2: one warning, resume from step_1, redo step 2; its log line is
    replaced, not repeated. With every checkpoint broken (a missing optimizer.pt in step_1 too): one error line."""
    out = copy_run(two_steps, tmp_path / "run")
    weights = out / "checkpoints" / "step_2" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(100)
    res = resume(out, timeout=300)
    assert res.returncode == 0, res.tail()
    warnings = [ln for ln in res.stdout.splitlines() if "train.py: warning:" in ln]
    assert len(warnings) == 1 and "step_2 is not whole (model.safetensors: 100 bytes" in warnings[0], res.tail()
    assert "falling back to step_1" in warnings[0]
    assert [m["step"] for m in read_metrics(out)] == [1, 2]  # no validation (--eval-every 0): no step-0 line
    assert checkpoint.verify(str(out / "checkpoints" / "step_2")) is None  # rewritten whole
    assert_same_weights(str(two_steps / "checkpoints" / "step_2"), str(out / "checkpoints" / "step_2"))

    os.remove(out / "checkpoints" / "step_1" / "optimizer.pt")
    with open(weights, "r+b") as f:
        f.truncate(100)
    line = one_error(resume(out))
    assert "--resume: no whole checkpoint in" in line, line


def test_a_second_trainer_on_the_same_out_fails_naming_the_holder(two_steps, tmp_path):
    out = copy_run(two_steps, tmp_path / "run")
    held = checkpoint.lock(str(out))  # this test process plays the running trainer
    try:
        line = one_error(resume(out))
        assert f"is in use by pid {os.getpid()} on " in line and "choose another --out" in line, line
    finally:
        held.close()
    assert resume(out).returncode == 0  # the lock went with its holder (nothing left to do: step 2 of 2)


# ----------------------------------------------------------------------------------------------------------
# kills
def start(out, extra=()):
    """torchrun in its own process group (so that the whole run can be killed at once)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), TRAIN, *map(str, extra)]
    return subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def logged_steps(out):
    try:
        return [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    except (FileNotFoundError, ValueError):
        return []


KILL_RUN = dict(algo="ppo", steps=4, rollout="hf", eval_every=2, **CKPT)  # PPO: the weights move even at reward 0


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Kill every process of a run (SIGKILL to the process group) right after a step's log line is written and
    before its checkpoint is, then at random moments, resuming after each kill; the finished run's metrics.jsonl
    equals an uninterrupted run's line by line (timings aside), and so do its final weights."""
    a = tmp_path / "a"
    res = torchrun(TRAIN, flags(out=a, **KILL_RUN), timeout=420)
    assert res.returncode == 0, res.tail()
    b, rng, kills = tmp_path / "b", random.Random(0), []
    for attempt in range(8):
        resuming = {"resume": True} if checkpoint.latest(str(b / "checkpoints"), warn=lambda line: None) else {}
        proc, t0 = start(b, flags(out=b, **resuming, **KILL_RUN)), time.time()
        kill_after = rng.uniform(5, 30)
        while attempt < 6 and proc.poll() is None:
            if attempt == 0:  # the first kill: a step is logged and its checkpoint is not there yet
                window = [n for n in logged_steps(b) if n and not os.path.exists(b / "checkpoints" / f"step_{n}")]
                if window:
                    os.killpg(proc.pid, signal.SIGKILL)
                    kills.append(f"after the log line of step {window[-1]}")
                    break
            elif time.time() - t0 > kill_after:
                os.killpg(proc.pid, signal.SIGKILL)
                kills.append(f"at {time.time() - t0:.1f} s")
                break
            time.sleep(0.005)
        proc.wait(timeout=420)
        if proc.returncode == 0 and logged_steps(b)[-1:] == [KILL_RUN["steps"]]:
            break
    else:
        pytest.fail(f"the run did not finish after kills {kills}")
    assert kills and kills[0].startswith("after the log line"), kills
    la, lb = read_metrics(a), read_metrics(b)
    assert [m["step"] for m in lb] == [m["step"] for m in la] == list(range(KILL_RUN["steps"] + 1)), kills
    for x, y in zip(la, lb):
        assert_same_metrics(x, y, f"after kills {kills}")
    assert_same_weights(str(a / "checkpoints" / "step_4"), str(b / "checkpoints" / "step_4"))


@pytest.mark.slow
def test_kill_9_of_torchrun_takes_its_workers_down(tmp_path):
    proc = start(tmp_path / "run", flags(out=tmp_path / "run", steps=50, rollout="hf"))
    try:
        deadline, workers = time.time() + 60, []
        while len(workers) < 2 and time.time() < deadline:
            time.sleep(0.2)
            workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and parent_of(int(p)) == proc.pid]
        assert len(workers) == 2, "torchrun started no workers"
        time.sleep(5)  # past their start-up
        os.kill(proc.pid, signal.SIGKILL)  # the launcher alone, as `kill -9 <torchrun pid>` does
        proc.wait()
        deadline = time.time() + 10
        while any(alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(alive(w) for w in workers), "orphaned workers outlived torchrun"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def parent_of(pid):
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_non_finite_updates_are_skipped_and_the_run_stops(tmp_path):
    """--lr 10 on PPO: the weights blow up at step 2, and from step 3 every loss is non-finite. Those updates are
    skipped on both ranks (counted), the run stops after --max-skipped-steps 3 with one line, and every
    checkpoint written holds finite weights; the newest is kept."""
    out = tmp_path / "run"
    res = torchrun(TRAIN, flags(out=out, algo="ppo", lr=10, critic_lr=10, steps=8, rollout="hf", eval_every=0,
                                max_response_len=32, save_every=1), timeout=420)
    assert res.returncode != 0
    errors = [ln for ln in res.stderr.splitlines() if "train.py: error:" in ln]
    assert len(errors) == 1 and "3 steps in a row (to step 5) had a non-finite loss" in errors[0], res.tail()
    lines = read_metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]  # --eval-every 0: no step-0 validation line
    assert [m["skipped_updates"] for m in lines] == [0, 0, 1, 1, 1]
    assert checkpoints(out) == ["step_3", "step_4"]  # step 5 changed nothing and was not saved
    from safetensors.torch import load_file
    for step in ("step_3", "step_4"):
        for name, t in load_file(str(out / "checkpoints" / step / "model.safetensors")).items():
            assert torch.isfinite(t).all(), f"{step}: {name}"
