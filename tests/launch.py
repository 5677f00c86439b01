"""Launch train.py (or a helper script) as a subprocess, alone or under torchrun, for the trainer tests."""
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from cli import free_port  # noqa: E402 (the tests import it from here)

# variables that would make a child believe it is already a rank of some other job
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
              "MASTER_PORT", "TORCHELASTIC_RUN_ID")


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float      # wall clock
    cpu_seconds: float  # user + system time of the child and its descendants: unlike the wall clock, it does
                        # not grow when other jobs share the machine

    def tail(self, n=3000):
        """The end of both streams, for assertion messages."""
        return f"--- stdout (tail) ---\n{self.stdout[-n:]}\n--- stderr (tail) ---\n{self.stderr[-n:]}"


def child_env():
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env["OMP_NUM_THREADS"] = "1"  # one thread per rank: 2 ranks on 2 cores; more is 5-8x slower
    env["PYTHONUNBUFFERED"] = "1"
    # a world of one still opens a TCP store: never the fixed default port another run may hold
    env["MASTER_ADDR"], env["MASTER_PORT"] = "127.0.0.1", str(free_port())
    return env


def run(cmd, timeout):
    """Run cmd from the repo root in its own process group; on timeout, kill that group (torchrun's ranks
    included) and fail."""
    t0, r0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                out, err = proc.communicate(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
        raise AssertionError(f"{' '.join(map(str, cmd))} did not finish in {timeout} s\n"
                             f"--- stdout ---\n{(out or '')[-3000:]}\n--- stderr ---\n{(err or '')[-3000:]}")
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return Result(proc.returncode, out, err, time.time() - t0, cpu)


def torchrun(script, args, nproc=2, timeout=420):
    """torchrun --nproc_per_node=nproc script args, on a free port."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), script, *map(str, args)]
    return run(cmd, timeout)


def python(script, args, timeout=120):
    """python script args: train.py runs as a world of one when RANK is unset."""
    return run([sys.executable, script, *map(str, args)], timeout)
