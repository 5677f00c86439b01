"""The run's metrics log, OUT/metrics.jsonl, and what is drawn from it: curves.png, and wandb when asked for.

One line per step, written (and fsynced) before that step's checkpoint; on resume trim_log() drops the lines past
the checkpoint, so the log always agrees with the checkpoints (checkpoint.py). Called on rank 0 only.
"""
import json
import math
import os


def log(path, metrics, wandb=None):
    """One step's metrics: a line on stdout (through tqdm, under its bar), a JSON line appended to metrics.jsonl
    (non-finite floats as null, so it stays valid JSON; fsynced before returning, since the step's checkpoint
    comes after it), and wandb when a run was started."""
    from tqdm import tqdm
    tqdm.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    metrics = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
    with open(path, "a") as f:
        f.write(json.dumps(metrics) + "\n")
        f.flush()
        os.fsync(f.fileno())
    if wandb:
        wandb.log(metrics, step=metrics["step"])


def trim_log(path, step):
    """Atomically rewrite a metrics.jsonl keeping only the JSON-object lines whose "step" is <= step.
    Lines that do not parse (a line cut by a kill) go too. On resume this leaves one line per step done.
    Returns how many lines were dropped; a missing file is left missing."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return 0
    with open(path, "rb") as f:  # bytes: a cut line may end inside a UTF-8 character
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a cut line; UnicodeDecodeError is a ValueError too
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line.rstrip(b"\n") + b"\n")
    with open(path + ".tmp", "wb") as f:  # fsynced before the rename: the log must survive the next crash too
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return len(lines) - len(kept)


def start_wandb(project, config):
    """wandb (the module, its run started) when it is installed, else None with a note: it is optional."""
    try:
        import wandb
    except ImportError:
        print(f"--wandb {project}: wandb is not installed; logging to metrics.jsonl only")
        return None
    wandb.init(project=project, config=config, resume="allow")
    return wandb


def plot_curves(metrics_path, png_path, extra_keys=()):
    """PNG of a run's curves from its metrics.jsonl: one panel per metric. Returns False (and draws nothing)
    without matplotlib or a log: the run never needs it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        with open(metrics_path) as f:
            rows = [json.loads(line) for line in f]
    except (ImportError, FileNotFoundError):
        return False
    keys = [k for k in ("reward_mean", "acc", "response_len", "val_greedy_acc", "val_acc", "val_greedy_response_len",
                        *extra_keys) if any(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2 * len(keys)), sharex=True, squeeze=False)
    for ax, k in zip(axes[:, 0], keys):
        ax.plot(*zip(*[(r["step"], r[k]) for r in rows if r.get(k) is not None]),
                marker="." if k.startswith("val") else None)
        ax.set_ylabel(k, fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return True
