"""Tests of checkpoint.py (and logs.trim_log): what a crash, a kill -9 or a second run on the same folder may and may
not leave behind."""
import json
import os
import random
import select
import signal
import sys
import time

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import checkpoint  # noqa: E402
import logs  # noqa: E402


def write_files(d):
    """What train.py writes, in miniature: weights, optimizer, trainer state, and a critic/ subfolder."""
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(bytes(range(256)) * 40)  # 10,240 bytes
    torch.save({"exp_avg": torch.arange(100.0)}, os.path.join(d, "optimizer.pt"))
    torch.save({"step": 12}, os.path.join(d, "trainer_state.pt"))
    os.makedirs(os.path.join(d, "critic"))
    with open(os.path.join(d, "critic", "model.safetensors"), "wb") as f:
        f.write(b"critic" * 100)


def make(root, step):
    d = os.path.join(root, f"step_{step}")
    checkpoint.save(d, write_files, info={"step": step})
    return d


def test_a_whole_checkpoint_verifies_and_its_manifest_lists_every_file(tmp_path):
    d = make(tmp_path, 12)
    assert checkpoint.verify(d) is None
    manifest = json.load(open(os.path.join(d, "manifest.json")))
    assert sorted(manifest["files"]) == ["critic/model.safetensors", "model.safetensors", "optimizer.pt",
                                         "trainer_state.pt"]
    assert manifest["files"]["model.safetensors"]["size"] == 10240
    assert manifest["info"] == {"step": 12}
    assert not os.path.exists(d + ".tmp")


def test_each_kind_of_damage_gives_its_reason(tmp_path):
    d = make(tmp_path, 1)
    with open(os.path.join(d, "model.safetensors"), "r+b") as f:
        f.truncate(1234)  # a write cut short
    assert checkpoint.verify(d) == "model.safetensors: 1234 bytes, manifest says 10240"

    d = make(tmp_path, 2)
    os.remove(os.path.join(d, "optimizer.pt"))
    assert checkpoint.verify(d) == "optimizer.pt missing"

    d = make(tmp_path, 3)
    path = os.path.join(d, "trainer_state.pt")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01  # same size, one bit different
    open(path, "wb").write(data)
    assert checkpoint.verify(d) == "trainer_state.pt: sha256 mismatch"
    assert checkpoint.verify(d, hashes=False) is None  # the size check alone cannot see it

    d = make(tmp_path, 4)
    os.remove(os.path.join(d, "manifest.json"))
    assert checkpoint.verify(d) == "no manifest.json"


def test_steps_lists_step_folders_in_numeric_order_only(tmp_path):
    for name in ["step_10", "step_2", "step_11.tmp", "step_x", "latest"]:
        os.makedirs(tmp_path / name)
    (tmp_path / "step_3").write_text("a file, not a folder")
    assert checkpoint.steps(tmp_path) == [(2, os.path.join(tmp_path, "step_2")),
                                          (10, os.path.join(tmp_path, "step_10"))]  # 10 after 2: numbers
    assert checkpoint.steps(tmp_path / "absent") == []


def test_latest_falls_back_to_the_previous_whole_checkpoint_and_warns_once(tmp_path):
    make(tmp_path, 10)
    d12 = make(tmp_path, 12)
    os.remove(os.path.join(d12, "manifest.json"))
    warnings = []
    assert checkpoint.latest(tmp_path, warn=warnings.append) == os.path.join(tmp_path, "step_10")
    assert warnings == ["checkpoint step_12 is not whole (no manifest.json); falling back to step_10"]


def test_latest_is_none_when_nothing_is_whole(tmp_path):
    assert checkpoint.latest(tmp_path, warn=pytest.fail) is None  # empty: None, and nothing to warn about
    os.remove(os.path.join(make(tmp_path, 5), "optimizer.pt"))
    warnings = []
    assert checkpoint.latest(tmp_path, warn=warnings.append) is None
    assert warnings == ["checkpoint step_5 is not whole (optimizer.pt missing); no whole checkpoint left"]


def test_prune_keeps_the_newest_whole_ones(tmp_path):
    for step in [2, 4, 6, 8, 10]:
        make(tmp_path, step)
    os.remove(os.path.join(tmp_path, "step_10", "manifest.json"))  # newest is broken: it is not one of the kept
    os.remove(os.path.join(tmp_path, "step_2", "manifest.json"))   # an old broken one goes with the old ones
    os.makedirs(tmp_path / "step_5.tmp")                           # a crashed save
    checkpoint.prune(tmp_path, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["step_10", "step_6", "step_8"]

    checkpoint.prune(tmp_path, keep=0)  # never deletes the newest whole one
    assert sorted(os.listdir(tmp_path)) == ["step_10", "step_8"]
    checkpoint.prune(tmp_path, keep=5)  # fewer whole ones than that: deletes nothing
    assert sorted(os.listdir(tmp_path)) == ["step_10", "step_8"]


@pytest.mark.parametrize("same_step", [False, True])
def test_a_crash_while_writing_leaves_the_previous_checkpoint_untouched(tmp_path, same_step):
    d10 = make(tmp_path, 10)
    before = {name: open(os.path.join(d10, name), "rb").read() for name in os.listdir(d10) if name != "critic"}

    def crash(d):
        write_files(d)
        raise KeyboardInterrupt("killed while writing")

    final = d10 if same_step else os.path.join(tmp_path, "step_12")  # re-saving step 10, or saving a new step
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(final, crash)
    assert {name: open(os.path.join(d10, name), "rb").read() for name in before} == before
    assert checkpoint.verify(d10) is None
    assert not os.path.exists(os.path.join(tmp_path, "step_12"))
    assert checkpoint.latest(tmp_path, warn=pytest.fail) == d10
    checkpoint.save(final, write_files)  # the next save of that step clears the leftover .tmp
    assert sorted(os.listdir(tmp_path)) == ["step_10"] if same_step else ["step_10", "step_12"]


def fork(fn):
    """Run fn(say) in a forked child: a real second process, without the 2 s of a fresh interpreter importing
    torch. say(text) sends a line back, and so does an exception. Returns (pid, read end of the pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        os.close(r)
        try:
            fn(lambda text: os.write(w, f"{text}\n".encode()))
        except BaseException as e:
            os.write(w, f"{type(e).__name__}: {e}\n".encode())
        os._exit(0)
    os.close(w)
    return pid, r


def read_lines(fd, n, timeout=30):
    """The first n lines sent through a pipe (a deadline instead of a hang if they never come)."""
    buf, deadline = b"", time.time() + timeout
    while buf.count(b"\n") < n:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.time()))
        chunk = os.read(fd, 4096) if ready else b""
        assert chunk, f"the child sent {buf!r} and then nothing"
        buf += chunk
    return buf.decode().splitlines()


def gone(pid):
    """True once pid has exited (a zombie waiting for init to reap it counts as exited)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_lock_refuses_a_second_process_naming_the_holder_and_dies_with_it(tmp_path):
    def hold(say):
        f = checkpoint.lock(tmp_path)  # noqa: F841 (held while this process lives)
        say("locked")
        time.sleep(60)
    holder, pipe = fork(hold)
    try:
        assert read_lines(pipe, 1) == ["locked"]
        second, pipe2 = fork(lambda say: checkpoint.lock(tmp_path))
        [message] = read_lines(pipe2, 1)
        os.waitpid(second, 0)
        assert message.startswith(f"RuntimeError: {tmp_path} is in use by pid {holder} on ")
        assert "running since 20" in message and "pytest" in message  # the holder's start time and command
    finally:
        kill(holder)  # SIGKILL: no chance to clean up
        os.waitpid(holder, 0)
    f = checkpoint.lock(tmp_path)  # the kernel released the lock with the process
    assert (tmp_path / ".lock").read_text().startswith(f"pid {os.getpid()} on ")
    f.close()


def test_exit_with_parent_takes_the_child_down_when_the_parent_is_killed():
    def parent(say):
        def child(_):
            say(checkpoint.exit_with_parent())  # through the parent's pipe, which the child inherits
            time.sleep(60)
        pid, _ = fork(child)
        say(pid)
        os.waitpid(pid, 0)
    parent_pid, pipe = fork(parent)
    lines = read_lines(pipe, 2)  # the child's answer and its pid, in whichever order the two processes wrote them
    armed, pid = sorted(lines, key=str.isdigit)
    pid = int(pid)
    try:
        assert armed == "True"
        os.kill(parent_pid, signal.SIGKILL)
        os.waitpid(parent_pid, 0)
        deadline = time.time() + 5
        while not gone(pid) and time.time() < deadline:
            time.sleep(0.02)
        assert gone(pid)
    finally:
        kill(pid)


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # leave a cached gaussian in both, part of the state
    state = checkpoint.rng_state()

    def draw():
        return torch.rand(4).tolist(), np.random.standard_normal(4).tolist(), [random.gauss(0, 1) for _ in range(3)]
    expected = draw()
    draw()  # move every generator on
    torch.save(state, tmp_path / "rng.pt")
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draw() == expected


def test_trim_log_keeps_steps_up_to_the_checkpoint_and_drops_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)]
    path.write_text("".join(lines) + '{"step": 6, "lo')  # killed in the middle of writing step 6
    assert logs.trim_log(path, 3) == 3
    assert path.read_text() == "".join(lines[:3])

    path.write_text("".join(lines) + '{"step": 6, "lo')
    assert logs.trim_log(path, 10) == 1
    assert path.read_text() == "".join(lines)
    assert not os.path.exists(str(path) + ".tmp")
    assert logs.trim_log(tmp_path / "absent.jsonl", 3) == 0


def test_arg_differences_names_the_flags_that_changed():
    saved = {"algo": "grpo", "lr": 1e-6, "kv_cache_gib": 1, "out": "runs/a", "stop": ("a", "b")}
    now = {"algo": "ppo", "lr": 1e-6, "kv_cache_gib": 2, "out": "runs/b", "stop": ["a", "b"], "new_flag": 0}
    assert checkpoint.arg_differences(saved, now, ["algo", "lr", "kv_cache_gib", "stop", "new_flag"]) == [
        "--algo: saved 'grpo', now 'ppo'", "--kv-cache-gib: saved 1, now 2", "--new-flag: saved (not recorded), now 0"]
    assert checkpoint.arg_differences(saved, saved, list(saved)) == []


def _save_slowly(rank, world, port, folder, out):
    """A 2-rank FSDP2 checkpoint whose writing (rank 0) takes 4 s, in a world whose default timeout is 2 s."""
    import datetime

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=2))
    wait_group = dist.new_group(timeout=datetime.timedelta(seconds=60))
    model = fully_shard(AutoModelForCausalLM.from_pretrained(folder), mesh=init_device_mesh("cpu", (world,)))
    optimizer = torch.optim.AdamW(model.parameters())
    trained = [(model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), "policy")]
    write = checkpoint.save
    checkpoint.save = lambda *a, **kw: (time.sleep(4), write(*a, **kw))  # a disk slower than the default timeout
    try:
        out[rank] = checkpoint.save_training(os.path.join(folder, "ckpt", "step_1"), trained,
                                             AutoTokenizer.from_pretrained(folder), {"step": 1}, {"step": 1},
                                             wait_group)
    except Exception as e:  # noqa: BLE001 (reported to the test)
        out[rank] = f"{type(e).__name__}: {e}"
    dist.destroy_process_group()


def test_only_the_wait_for_rank_0s_disk_has_the_long_timeout(tmp_path):
    """train.py keeps the backend's default timeout for every collective but those that wait on rank 0's disk
    (disk_waits, SAVE_TIMEOUT): a write that outlasts the default (here 4 s against 2 s) completes on both ranks,
    and the checkpoint is whole."""
    import pretrain
    import torch.multiprocessing as mp
    from cli import free_port
    folder = str(tmp_path / "m")
    pretrain.build_tiny_model(folder)
    out = mp.Manager().dict()
    mp.spawn(_save_slowly, args=(2, free_port(), folder, out), nprocs=2)
    assert out[0] is True and out[1] is True, dict(out)
    assert checkpoint.verify(os.path.join(folder, "ckpt", "step_1")) is None
