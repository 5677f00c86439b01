"""Validation on held-out tasks, as train.py runs it every --eval-every steps (and at the start and the end).

Greedy decoding (and with --eval-sampled, sampling at --temperature) of the first --eval-prompts test prompts,
split over the ranks: mean reward, accuracy (score 1.0), the share of responses with a complete answer block
(answer_frac) and response length, and for Countdown rows the aha metrics (aha.py): attempts per response,
answers that repeat an attempt that hit the target, responses that stop right after the first hit.
Keys: val_greedy_* (and val_*). A few responses go to OUT/samples.
"""
import json
import os

import torch.distributed as dist

import aha
import data
import rewards
import rollout


def validate(engine, tokenizer, split, step, args, allreduce):
    """Collective: every rank scores its share of the test prompts; allreduce (train.py's) sums over ranks.
    split: the test split (data.Split). Returns the metrics."""
    rank, world = dist.get_rank(), dist.get_world_size()
    rows, prompts = split.batch(list(range(len(split)))[: args.eval_prompts or None][rank::world], tokenizer)
    out = {}
    for name, temp in (("val", args.temperature), ("val_greedy", 0.0))[0 if args.eval_sampled else 1:]:
        samples, texts, scores, _ = rollout.sample_and_score(engine, tokenizer, rows, prompts, n=1, temperature=temp,
                                                             top_p=args.top_p, max_tokens=args.max_response_len,
                                                             seed=10**6 * (step + 1) + rank, stop=args.stop)
        found = [x for x in map(aha.row_metrics, rows, texts) if x is not None]
        tot = allreduce({"n": len(scores), "reward": sum(scores), "acc": sum(x == 1.0 for x in scores),
                         "answer": sum(rewards.extract_answer(t) is not None for t in texts),
                         "len": sum(len(x["token_ids"]) for x in samples), "n_aha": len(found),
                         **{k: sum(x[k] for x in found) for k in aha.KEYS}})
        n = max(tot["n"], 1)
        out.update({f"{name}_reward": tot["reward"] / n, f"{name}_acc": tot["acc"] / n,
                    f"{name}_answer_frac": tot["answer"] / n, f"{name}_response_len": tot["len"] / n})
        if tot["n_aha"]:
            out.update({f"{name}_{k}": tot[k] / tot["n_aha"] for k in aha.KEYS})
        if rank == 0 and args.log_samples:
            os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
            with open(os.path.join(args.out, "samples", f"step_{step}_{name}.jsonl"), "w") as f:
                for r, text, sc in list(zip(rows, texts, scores))[: args.log_samples]:
                    f.write(json.dumps({"prompt": data.prompt_text(r, tokenizer), "response": text,
                                        "score": sc}) + "\n")
    return out
