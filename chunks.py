"""The task generators' engine (countdown.make, multiply.make): n tasks drawn in fixed-size chunks, each chunk
with its own seed, so that the tasks are a function of the seed and the options whether the chunks run in this
process or in a pool of them. Standard library only, but for the progress bar (tqdm, imported when run)."""
import contextlib
import os

CHUNK = 2048  # tasks per generator chunk; each chunk has its own seed, so output does not depend on workers
MAX_FAILED_DRAWS = 20_000  # consecutive useless draws before a generator gives up on its options


def run(fn, n, args, workers, progress, desc):
    """Run fn over fixed-size chunks (serially or in a process pool) and concatenate, with a progress bar."""
    jobs = [args[:1] + (c, min(CHUNK, n - c * CHUNK)) + args[1:] for c in range((n + CHUNK - 1) // CHUNK)]
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)), 8) if n >= 20_000 else 1
    import multiprocessing
    from tqdm import tqdm  # lazily: importing the task modules (as data.py does) imports neither
    out, pool = [], multiprocessing.Pool(workers) if workers > 1 and len(jobs) > 1 else None
    with pool or contextlib.nullcontext(), tqdm(total=n, desc=desc, unit=" tasks", disable=not progress) as bar:
        for part in (pool.imap(fn, jobs) if pool else map(fn, jobs)):  # in chunk order; leaving terminates the pool
            out += part
            bar.update(len(part))
    return out
