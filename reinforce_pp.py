"""REINFORCE++ (Hu 2025; veRL's 'reinforce_plus_plus'), --algo reinforce++: no critic and no group baseline. The
per-token reward is PPO's (the score on the last token, -kl_coef * k1 of the old policy to the reference on every
token), its return is the advantage of each token, whitened over the batch of all ranks. The loss is GRPO's clipped
surrogate without its KL term (the KL is in the reward). docs/algorithms.md has the formulas.
"""
import torch

import grpo
from ppo import gae, kl_penalty, masked_whiten, token_rewards

# ALGO CONTRACT: what train.py reads of this module (ppo.py's docstring) ---------------------------------------------
CRITIC = False       # the batch's whitening is the baseline
PRM = False          # no process reward model
KL_IN_REWARD = True  # kl_coef * k1 of the old policy is a per-token reward: the old log-probs come first


@torch.no_grad()
def reinforce_pp_advantages(scores, mask, kl=None, kl_coef=0.0, gamma=1.0):
    """The per-token reward is -kl_coef * kl on every token with the score added on the last (ppo.token_rewards, as
    PPO's), its return G_t = sum_{s >= t} gamma^(s-t) r_s (GAE with no critic and lambda = 1), whitened over the
    batch of ALL ranks. Padding stays 0. scores [B], mask and kl [B, T]; returns [B, T]."""
    returns, _ = gae(token_rewards(scores, mask, kl, kl_coef), torch.zeros_like(mask), mask, gamma, 1.0)  # [B, T]
    return masked_whiten(returns, mask, all_ranks=True)


# ALGO LOGIC ---------------------------------------------------------------------------------------------------------
def check(args):
    """Any --group-size works (no group baseline); the adaptive KL controller is PPO's."""
    if args.kl_ctrl == "adaptive":
        return "--kl-ctrl adaptive steers PPO's KL reward: use --algo ppo"
    return None


def skip_zero_rows(args, kl_coef):
    """Never: whitened returns are all 0 on a row only by chance, and the loss logs the KL of every row."""
    return False


@torch.no_grad()
def advantages(batch, scores, args, kl_coef):
    """REINFORCE++'s advantages into batch["advantages"] [B, T]; no metrics (its loss logs the KL)."""
    kl = kl_penalty(batch["old_logp"], batch["ref_logp"], "k1") if "ref_logp" in batch else None  # [B, T]
    batch["advantages"] = reinforce_pp_advantages(scores, batch["mask"], kl, kl_coef, args.gamma)
    return {}


def loss(logp, entropy, values, mb, args, kl_coef, denom):
    """GRPO's loss with kl_coef 0: the KL is in the reward (its value is still logged, as "kl")."""
    return grpo.loss(logp, entropy, values, mb, args, 0.0, denom)


next_kl_coef = grpo.next_kl_coef  # a fixed coefficient
