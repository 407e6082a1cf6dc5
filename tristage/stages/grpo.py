"""Stage 3b without a critic: GRPO and RLOO. k answers per prompt; each answer's advantage is its reward measured
against the other answers to the same prompt, so no value model is trained.

    tristage grpo runs/sft/model --reward runs/reward/model --prompts prompts.jsonl --out runs/grpo
    tristage grpo runs/sft/model --reward gold --prompts p.jsonl                        # a verifier as the reward
    tristage grpo runs/sft/model --reward python:mypkg.rewards:exact --prompts p.jsonl  # any Python function
    tristage grpo runs/sft/model --reward runs/reward/model --prompts p.jsonl --baseline rloo --beta 0.05

The algorithm (estimators in tristage/train/rl.py):
1. Rollout: each prompt gets --num-samples answers from the policy (the shared engine, one seed per answer); one
   no-grad pass gives the policy's and the reference's log-probs of every answer token (sampling temperature). With
   one optimizer step per batch (--ppo-epochs 1, --num-minibatches 1, the default) the policy's come from that
   step's own forward instead (the ratio is then exactly 1, as a separate pass would give; one pass fewer).
2. Reward: the reward model's score, or any scorer (`gold`, `python:MODULE:FUNCTION` called as
   f(prompt text, [answers]) -> [numbers]), minus --missing-eos-penalty for answers that did not end their turn.
3. Advantage, one flag apart (--baseline):
   grpo           (r - mean of the group) / (std of the group + 1e-4); the KL is a k3 penalty in the loss,
                  beta * k3 per token (DeepSeekMath), when --beta > 0;
   grpo-unscaled  r - mean of the group (no division by the std: "Dr. GRPO");
   rloo           r' - mean of the other k - 1 answers' r', with r' = r - beta * (sum of k1 over the answer): the
                  KL is in the reward (Ahmadian et al. 2024), never also in the loss.
4. Update: --ppo-epochs passes (default 1: each batch is used once, so the ratio is 1 and the clip only guards the
   minibatches after the first) over --num-minibatches minibatches, the clipped surrogate with the answer's
   advantage at each of its tokens. Aggregation (--loss-agg): `token`, the mean over every answer token of the
   batch (DAPO, Dr. GRPO; the default: a long answer's tokens weigh as much as a short one's), or `sequence`, each
   answer's token mean and then the mean over answers (GRPO's original form).

Choices, and why:
- Prompts whose k answers all get the same reward carry no signal (every advantage is 0); they are counted
  ("flat_groups", the share of such groups per step) and still trained on, which only costs compute.
- The reference model is always loaded: the KL to it is logged every step and drawn by the held-out monitor even
  when --beta is 0 (then it is not in the loss).
"""

from __future__ import annotations

import torch

from tristage.flags.grpo import Config
from tristage.model.hf import load_model
from tristage.rollout import stop_ids as stop_ids_of
from tristage.stages import rl
from tristage.train import loop
from tristage.train.rl import clipped_policy_loss, group_advantages, kl_estimate


def advantages(b: rl.Rollouts, rewards: list[float], k: int, cfg: Config, s: loop.Session) -> dict[str, float]:
    """Per-answer advantages (stored per token in b.extra["adv"]) from the group baseline."""
    r = torch.tensor(rewards, dtype=torch.float32, device=s.device)
    r = r - cfg.missing_eos_penalty * (~torch.tensor(b.stopped, device=s.device))
    if cfg.baseline == "rloo" and cfg.beta > 0:
        kl = kl_estimate(b.old_logp, b.ref_logp, "k1")
        r = r - cfg.beta * torch.zeros_like(r).index_add(0, b.rows.row, kl)
    groups = r.view(-1, k)
    adv = group_advantages(groups, cfg.baseline).flatten()
    b.extra["adv"] = adv[b.rows.row]
    flat = float((groups.max(1).values == groups.min(1).values).float().mean())
    return {"shaped_reward": float(r.mean()), "flat_groups": flat}


def policy_loss(cfg: Config, seen: list[tuple[torch.Tensor, torch.Tensor]] | None) -> loop.LossFn:
    """A micro-batch's clipped surrogate with its answers' advantages, plus beta * k3 per token when the KL is in the
    loss. With `seen` (one optimizer step per batch) the rollout's log-probs are this forward's own, detached (the
    ratio is exactly 1), and each micro-batch's (log-probs, entropy) is appended to `seen`."""
    kl_in_loss = cfg.baseline != "rloo" and cfg.beta > 0

    def loss_fn(wrapped, mb):
        logp, ent = rl.policy_logprobs(wrapped, mb, cfg.temperature, entropy=seen is not None)
        if seen is not None:
            seen.append((logp.detach(), ent))
        old = logp.detach() if seen is not None else mb["old_logp"]
        one = torch.ones_like(logp, dtype=torch.bool)[None]
        w = (1.0 / mb["seq_len"])[None] if cfg.loss_agg == "sequence" else None
        loss, st = clipped_policy_loss(logp[None], old[None], mb["adv"][None], one, cfg.clip, w)
        if kl_in_loss:
            kl = kl_estimate(logp, mb["ref_logp"], "k3")
            loss = loss + cfg.beta * (kl * (w[0] if w is not None else 1.0)).sum()
            st["kl_loss"] = kl.detach().sum()
        return loss, st

    return loss_fn


def main(cfg: Config) -> dict:
    rl.check_args(cfg)
    s = loop.start(cfg, "grpo")
    if s.state is not None:
        loop.model_config(s.ckpt)
    ctx = rl.fit_answer_length(cfg)
    tokenizer = loop.chat_tokenizer(cfg.model)
    train, val, notes = rl.load_prompt_splits(cfg, tokenizer, ctx - cfg.max_new_tokens)
    reward = rl.make_scorer(cfg.reward, s, 1 << 30, "--reward")
    gold = rl.make_scorer(cfg.gold, s, 1 << 30, "--gold") if cfg.gold else None
    policy = loop.load_policy(s)
    ref = load_model(cfg.ref_model or cfg.model, device=s.device, dtype=torch.float32).eval().requires_grad_(False)
    t = loop.prepare(s, policy)
    d, stops, k = s.d, stop_ids_of(tokenizer, cfg.model), cfg.num_samples
    loader = rl.PromptLoader(train, cfg.batch_size, cfg.seed, d.rank, d.world_size)
    max_steps = loop.total_steps(cfg, loader.steps_per_epoch())
    per_step = cfg.ppo_epochs * cfg.num_minibatches
    start = loop.restore(s, t, loader)
    monitor = rl.Monitor(cfg, s, val, reward, gold, tokenizer, stops)
    if s.state is not None:
        monitor.load_state_dict(s.state["monitor"])
    loop.announce(s, *notes, f"{cfg.baseline}, {k} answers per prompt, loss {cfg.loss_agg} mean, beta {cfg.beta}; "
                             f"{len(train)} train / {len(val)} held-out prompts; {cfg.batch_size} x {d.world_size} "
                             f"prompts per step, {per_step} updates each; {max_steps} steps; {s.dtype}, {s.device}")
    # One optimizer step per rollout batch (and no KL in the reward, which needs the log-probs before it): the
    # rollout's log-probs are those of the policy as it is at that step, so they come from the step's own forward
    # instead of a separate no-grad pass over the batch.
    one_step = per_step == 1 and not (cfg.baseline == "rloo" and cfg.beta > 0)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # one_step: (log-probs, entropy) of each micro-batch
    loss_fn = policy_loss(cfg, seen if one_step else None)

    def count(mb) -> float:
        return mb["n_seqs"] if cfg.loss_agg == "sequence" else len(mb["lp_tok"])

    # generation, [the rollout's log-probs,] the reference's, the reward model
    forward = [(policy.config, True)] * (2 if one_step else 3) + rl.scorer_model(reward)
    metrics: dict = {}
    done = start
    with loop.Reporter(s, max_steps, start) as rep:
        watch, clock = rl.Watch(rep), rl.Clock()
        if start == 0 and cfg.eval_every > 0:  # the starting point of the curves (KL 0)
            metrics = rl.monitor_step(monitor, rep, watch, 0, t.model, ref, tokenizer, cfg)
        for step in range(start, max_steps):
            clock.lap("other")
            rows = next(loader)
            b = rl.collect(policy, ref, tokenizer, stops, rows, k, step, d.rank * cfg.batch_size * k, cfg, s, clock,
                           policy_pass=not one_step)
            rewards = rl.score(reward, b, k, s, tokenizer)
            golds = rl.score(gold, b, k, s, tokenizer) if gold is not None else None
            clock.lap("score")
            extra = advantages(b, rewards, k, cfg, s)
            upd = rl.update(s, t, b, loss_fn, count, cfg, step, max_steps)
            if one_step:  # the micro-batches came in answer order
                b.old_logp, b.entropy = (torch.cat(x) for x in zip(*seen))
                seen.clear()
            m = rl.batch_stats(b, d, kl_estimate(b.old_logp, b.ref_logp, "k1"), rewards, golds)
            clock.lap("update")
            m.update(upd, **clock.take(), **extra)
            rep.count(len(b.texts) * d.world_size, *rl.step_work(b, d.world_size, forward, [(policy.config, True)],
                                                                 cfg.ppo_epochs))
            done = step + 1
            metrics = rl.record(rep, watch, monitor, m, done, max_steps, t.model, ref, tokenizer, cfg, metrics)
            if loop.save_due(s, done, max_steps):
                loop.save(s, t, tokenizer, done, metrics, loader, final=done == max_steps, parent=cfg.model,
                          state={"monitor": monitor.state_dict()})
            rep.advance(done)
            if loop.stop_due(s, done):
                break
    loop.finish(s)
    return metrics
