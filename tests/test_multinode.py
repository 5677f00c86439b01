"""Two torchrun "nodes" on one machine (slow): `torchrun --nnodes 2 --nproc_per_node 1 --node_rank 0|1` on
localhost. Each node runs in a folder of its own with the same relative --out, as the same command on two machines
without a shared filesystem would: each node's OUT is its own.

- Node-local OUT: each node's local rank 0 makes the default data and the tiny model in its own OUT, the same bytes
  on both; the run equals a one-node run of 2 ranks (metrics and weights: ranks, data order and seeds are the same);
  rank 0 writes the log and checkpoints into node 0's OUT only. --resume then fails on both nodes in one line naming
  the cause (rank 1 cannot see the checkpoint).
- Shared OUT (one absolute folder for both nodes, as on a cluster's shared filesystem): --resume works.
- A --model folder that only node 0 has: both nodes fail in one line naming rank 1 (no node waits forever).
"""
import os
import shutil
import signal
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from launch import child_env, free_port, torchrun  # noqa: E402
from test_train import (TRAIN, assert_same_metrics, assert_same_weights, checkpoints, flags,  # noqa: E402
                        read_metrics)

pytestmark = pytest.mark.slow
# PPO: its critic makes the updates nonzero even with a random model, so equal weights mean equal training
RUN = dict(algo="ppo", rollout="hf", group_size=2, save_every=1)


def two_nodes(root, args, timeout=420):
    """The same train.py command as node 0 and node 1 of a 2-node torchrun job, each started in root/node{r}.
    Returns [(returncode, stdout, stderr)] of the two torchruns."""
    port, procs, logs = free_port(), [], []
    for r in (0, 1):
        cwd = os.path.join(root, f"node{r}")
        os.makedirs(cwd, exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(r), "--master_addr", "127.0.0.1", "--master_port", str(port), TRAIN, *args]
        # files, not pipes: a node blocked on a full pipe would stall the other in a collective
        logs.append((open(os.path.join(root, f"node{r}.out"), "w+"), open(os.path.join(root, f"node{r}.err"), "w+")))
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=logs[-1][0], stderr=logs[-1][1],
                                      text=True, start_new_session=True))
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise AssertionError(f"two-node run did not finish in {timeout} s: see {root}/node*.err")
    out = []
    for code, (o, e) in zip(codes, logs):
        o.seek(0), e.seek(0)
        out.append((code, o.read(), e.read()))
        o.close(), e.close()
    return out


def errors(stderr):
    return [line for line in stderr.splitlines() if line.startswith("train.py: error:")]


@pytest.fixture(scope="module")
def node_local(tmp_path_factory):
    root = tmp_path_factory.mktemp("nodes")
    return root, two_nodes(root, flags(out="run", steps=2, **RUN))


def test_node_local_out_trains_like_one_node(node_local, tmp_path):
    root, results = node_local
    for r, (code, _, err) in enumerate(results):
        assert code == 0, f"node {r} exited with {code}\n{err[-3000:]}"
    node0, node1 = root / "node0" / "run", root / "node1" / "run"
    # node 1's local rank 0 made its own default data and tiny model: the same bytes as node 0's
    for rel in ("data/train.jsonl", "data/test.jsonl", "tiny_model/model.safetensors", "tiny_model/config.json"):
        assert (node1 / rel).read_bytes() == (node0 / rel).read_bytes(), f"{rel} differs between the nodes"
    # rank 0 (node 0) writes the log and the checkpoints; node 1's OUT has none
    assert checkpoints(node0) == ["step_1", "step_2"] and not os.path.exists(node1 / "checkpoints")
    assert not os.path.exists(node1 / "metrics.jsonl")
    # the same job as one node with two ranks: every metric (timings aside) and the final weights
    ref = tmp_path / "ref"
    res = torchrun(TRAIN, flags(out=ref, steps=2, **RUN), nproc=2, timeout=420)
    assert res.returncode == 0, res.tail()
    a, b = read_metrics(ref), read_metrics(node0)
    assert [m["step"] for m in b] == [0, 1, 2]
    for x, y in zip(a, b):
        assert_same_metrics(x, y, "one node of 2 ranks vs two nodes of 1")
    assert_same_weights(str(ref / "checkpoints" / "step_2"), str(node0 / "checkpoints" / "step_2"))


def test_resume_with_node_local_out_fails_in_one_line(node_local):
    root, _ = node_local
    resumed = two_nodes(root, flags(out="run", steps=3, resume=True, **RUN))
    for r, (code, _, err) in enumerate(resumed):
        assert code != 0, f"node {r}: --resume should fail: node 1 cannot see node 0's checkpoint"
        # each node's torchrun shows the cause in one line, and no Python traceback of train.py
        assert errors(err) == [f"train.py: error: rank 1 ({os.uname()[1]}): --resume: run/checkpoints/step_2 is not "
                               "on this node (rank 0 writes checkpoints into its own --out): give every node one "
                               "shared --out, or copy it to each"], err[-3000:]
        assert "[rank0]: Traceback" not in err and "[rank1]: Traceback" not in err, err[-3000:]
    assert checkpoints(root / "node0" / "run") == ["step_1", "step_2"]  # nothing written


def test_shared_out_resumes(node_local, tmp_path):
    """One OUT for both nodes (an absolute path both see): rank 0 makes the defaults, node 1 finds them, and
    --resume reads the checkpoint on every rank."""
    root, _ = node_local
    shared = tmp_path / "shared"
    shutil.copytree(root / "node0" / "run", shared)
    resumed = two_nodes(tmp_path, flags(out=shared, steps=3, resume=True, **RUN))
    for r, (code, _, err) in enumerate(resumed):
        assert code == 0, f"node {r} exited with {code}\n{err[-3000:]}"
    assert [m["step"] for m in read_metrics(shared)] == [0, 1, 2, 3]
    assert checkpoints(shared) == ["step_2", "step_3"]


def test_model_on_one_node_only_fails_in_one_line(node_local, tmp_path):
    """--model names a folder that node 1 lacks: both nodes stop with the cause, none waits for the other."""
    root, _ = node_local
    shutil.copytree(root / "node0" / "run" / "tiny_model", tmp_path / "node0" / "model")
    failed = two_nodes(tmp_path, flags(out="run", steps=1, model="model", **RUN), timeout=180)
    for r, (code, _, err) in enumerate(failed):
        assert code != 0, f"node {r} should fail"
        assert errors(err) == [f"train.py: error: rank 1 ({os.uname()[1]}): --model 'model' is not a model folder "
                               "(no config.json there); give a local transformers folder or 'tiny'"], err[-3000:]
