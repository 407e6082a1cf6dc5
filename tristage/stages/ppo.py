"""Stage 3b, RLHF with PPO: the policy answers prompts, the reward model scores the answers, PPO moves the policy.

    tristage ppo runs/sft/model --reward runs/reward/model --prompts prompts.jsonl --out runs/ppo
    tristage ppo runs/sft/model --reward runs/reward/model --prompts p.jsonl --gold gold      # demo world: + gold
    tristage ppo runs/sft/model --reward runs/reward/model --prompts p.jsonl --kl-target 3    # adaptive KL
    tristage ppo runs/sft/model --reward gold --prompts p.jsonl            # a verifier or python:MODULE:FUNCTION

The algorithm (InstructGPT's form; the estimators are pure functions in tristage/train/rl.py):
1. Rollout: each prompt of a batch gets one answer sampled from the policy (the shared engine, KV cache, one seed
   per answer); a no-grad pass gives the policy's and the frozen reference's log-probs of every answer token at
   the sampling temperature, and the value model's value before each token.
2. Reward: per token r_t = -beta * KL_t (k1 = log p - log p_ref; the KL is in the reward, never in the loss), plus
   at the last token the reward model's score of the answer (minus --missing-eos-penalty when the answer did not
   end its turn). GAE (--gamma, --lam) gives advantages, whitened over the batch's tokens (every process's), and
   returns = advantages + values.
3. Update: --ppo-epochs passes over the batch in --num-minibatches minibatches, one optimizer step each: the
   clipped policy loss plus --vf-coef times the clipped value loss, each the mean over the minibatch's tokens.
   Policy and value model are one module with one AdamW and one gradient clip (as TRL's PPO trainer); the value
   model may learn at its own rate (--value-lr: with Adam, --vf-coef barely changes the value model's steps, a
   learning rate does).
4. --kl-target makes beta adaptive (Ziegler et al.): after each batch, beta moves toward the KL target.

Choices, and why:
- The value model starts from the reward model (--value-model reward, the default: at the answer's last token its
  value already equals the reward, which makes the first critic estimates sensible) or the policy (--value-model
  policy: a new head on a copy of the SFT model) or another reward-model folder. With a function as the reward
  (`gold`, `python:MODULE:FUNCTION`: a verifier, or the demo world's gold scorer to see PPO's ceiling) there is no
  reward model, and `reward` means the policy. Its weights travel in
  training_state.pt, so a checkpoint stays a plain Hugging Face policy folder; out/value is written at the end
  (a reward-model folder, for inspection).
- --max-steps counts rollout batches; the optimizer takes ppo_epochs x num_minibatches steps per batch, and the
  learning-rate schedule runs over those.
- Dropout: the models have none (LoRA dropout is not offered here), so the first minibatch's ratio is 1 (tested).
- Metrics per step: reward, gold (with --gold), KL, entropy, length, stop rate, distinct answers, the beta in use,
  clip fraction, value loss, explained variance, ratio mean and max; warnings when the KL goes negative, the ratio
  drifts, answers collapse or the held-out reward rises while the gold falls (tristage/stages/rl.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tristage.flags.ppo import Config
from tristage.io import UserError
from tristage.model.hf import load_model, save_model
from tristage.model.score import ScoreModel, load_reward_model, save_reward_model, value_model_from
from tristage.rollout import stop_ids as stop_ids_of
from tristage.runtime import autocast
from tristage.stages import rl
from tristage.tokenizer import Tokenizer
from tristage.train import loop
from tristage.train.rl import (
    AdaptiveKL,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    kl_estimate,
    masked_whiten,
    token_rewards,
)


class PolicyAndValue(nn.Module):
    """The policy and the value model as one module: one forward gives both (so DDP syncs both)."""

    def __init__(self, policy: nn.Module, value: ScoreModel):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, batch: dict[str, Tensor], temperature: float) -> tuple[Tensor, Tensor]:
        """Log-probs [M] of the answer tokens and the values [M] before each (flat layout, tristage.stages.rl)."""
        logp, _ = rl.policy_logprobs(self.policy, batch, temperature)
        return logp, values_at(self.value, batch["input_ids"], batch["lp_row"], batch["lp_pos"])


def values_at(value: ScoreModel, input_ids: Tensor, row: Tensor, pos: Tensor) -> Tensor:
    """The value model's outputs [M] at (row, pos): one pass over every token, then a gather. Reading at almost
    every answer token through `at=` would copy each row's keys once per read position in the last layer (2.6x
    slower forward and backward at PPO's batch shapes, bench/RESULTS.md "PPO")."""
    return value(input_ids)[row, pos, 0].float()


def reward_model_folder(spec: str) -> str | None:
    """The reward model's folder of --reward (a folder or rm:PATH); None for a function (gold, python:...)."""
    kind, _, rest = spec.partition(":")
    if (kind == "gold" and not rest) or (kind == "python" and rest):
        return None
    return spec.removeprefix("rm:")


def value_start(cfg: Config, s: loop.Session, reward_folder: str | None, tokenizer: Any) -> ScoreModel:
    """The value model: the resumed run's, else from the reward model, the policy or a folder (--value-model). It
    reads the policy's token ids, so a reward-model start must share the policy's vocabulary. With a function as
    the reward there is no reward model to start from: `reward` means the policy."""
    if cfg.value_model == "policy" or (cfg.value_model == "reward" and reward_folder is None):
        vm = value_model_from(load_model(cfg.model, device=s.device, dtype=torch.float32), seed=cfg.seed)
    else:
        folder = reward_folder if cfg.value_model == "reward" else cfg.value_model
        loop.model_config(folder, "reward")
        if Tokenizer.load(folder).tok.get_vocab() != tokenizer.tok.get_vocab():
            raise UserError(f"--value-model {cfg.value_model}: {folder} has another tokenizer than the policy "
                            f"{cfg.model}; the value model reads the policy's tokens, so start it from the policy "
                            "(--value-model policy) or a reward model with the policy's tokenizer")
        vm = value_model_from(load_reward_model(folder, device=s.device, dtype=torch.float32))
    if s.state is not None:
        vm.load_state_dict(s.state["value"])
    return vm


def advantages(b: rl.Rollouts, scores: list[float], value: ScoreModel, beta: float, cfg: Config,
               s: loop.Session) -> dict[str, float]:
    """Values, per-token rewards, GAE and whitened advantages of a rollout batch, stored in b.extra (flat [M])."""
    with torch.no_grad(), autocast(s.device, s.dtype):
        v = values_at(value, b.rows.input_ids, b.rows.row, b.rows.pos)
    mask = b.rows.mask()
    sc = torch.tensor(scores, device=s.device) - cfg.missing_eos_penalty * (~torch.tensor(b.stopped, device=s.device))
    kl = kl_estimate(b.old_logp, b.ref_logp, "k1")
    r = token_rewards(sc, b.rows.padded(kl), mask, beta)
    adv, ret = gae(r, b.rows.padded(v), mask, cfg.gamma, cfg.lam)
    adv = masked_whiten(adv, mask, stats=rl.global_mean_var(adv[mask], s.d))
    b.extra.update(values=v, adv=adv[mask], returns=ret[mask], kl=kl)
    return {"score": float(sc.mean()), "explained_variance": explained_variance(b.rows.padded(v), ret, mask)}


def main(cfg: Config) -> dict:
    rl.check_args(cfg)
    s = loop.start(cfg, "ppo")
    if s.state is not None:
        loop.model_config(s.ckpt)
    reward_folder = reward_model_folder(cfg.reward)
    if reward_folder is not None:
        loop.model_config(reward_folder, "reward")
    ctx = rl.fit_answer_length(cfg)
    tokenizer = loop.chat_tokenizer(cfg.model)
    train, val, notes = rl.load_prompt_splits(cfg, tokenizer, ctx - cfg.max_new_tokens)
    reward = rl.make_scorer(cfg.reward, s, 1 << 30, "--reward")
    gold = rl.make_scorer(cfg.gold, s, 1 << 30, "--gold") if cfg.gold else None
    policy = loop.load_policy(s)
    ref = load_model(cfg.ref_model or cfg.model, device=s.device, dtype=torch.float32).eval().requires_grad_(False)
    value = value_start(cfg, s, reward_folder, tokenizer)
    scale = (cfg.value_lr or cfg.lr) / cfg.lr
    t = loop.prepare(s, PolicyAndValue(policy, value), lambda name: scale if name.startswith("value.") else 1.0)
    d, stops = s.d, stop_ids_of(tokenizer, cfg.model)
    loader = rl.PromptLoader(train, cfg.batch_size, cfg.seed, d.rank, d.world_size)
    max_steps = loop.total_steps(cfg, loader.steps_per_epoch())
    per_step = cfg.ppo_epochs * cfg.num_minibatches
    start = loop.restore(s, t, loader)
    kl_ctl = AdaptiveKL(cfg.beta, cfg.kl_target, cfg.kl_horizon)
    monitor = rl.Monitor(cfg, s, val, reward, gold, tokenizer, stops)
    if s.state is not None:
        kl_ctl.value = s.state["kl_coef"]
        monitor.load_state_dict(s.state["monitor"])
    loop.announce(s, *notes, f"{len(train)} train / {len(val)} held-out prompts; {cfg.batch_size} x {d.world_size} "
                             f"answers per step, {per_step} updates each; {max_steps} steps; value model from "
                             f"{cfg.value_model if reward_folder is not None else 'policy'}; {s.dtype}, {s.device}")
    def loss_fn(wrapped, mb):
        logp, v = wrapped(mb, cfg.temperature)
        one = torch.ones_like(logp, dtype=torch.bool)[None]
        pg, st = clipped_policy_loss(logp[None], mb["old_logp"][None], mb["adv"][None], one, cfg.clip)
        vl, vst = clipped_value_loss(v[None], mb["values"][None], mb["returns"][None], one, cfg.value_clip)
        return pg + cfg.vf_coef * vl, {"pg_loss": pg.detach(), "vf_loss": vl.detach(), **st, **vst}

    # generation, old and reference log-probs, reward, values; then the epochs train policy and value
    forward = [(policy.config, True)] * 3 + rl.scorer_model(reward) + [(value.config, False)]
    train_models = [(policy.config, True), (value.config, False)]
    metrics: dict = {}
    done = start
    with loop.Reporter(s, max_steps, start) as rep:
        watch, clock = rl.Watch(rep), rl.Clock()
        if start == 0 and cfg.eval_every > 0:  # the starting point of the curves (KL 0)
            metrics = rl.monitor_step(monitor, rep, watch, 0, policy, ref, tokenizer, cfg)
        for step in range(start, max_steps):
            clock.lap("other")
            rows = next(loader)
            b = rl.collect(policy, ref, tokenizer, stops, rows, 1, step, d.rank * cfg.batch_size, cfg, s, clock)
            scores = rl.score(reward, b, 1, s, tokenizer)
            golds = rl.score(gold, b, 1, s, tokenizer) if gold is not None else None
            clock.lap("score")
            extra = advantages(b, scores, value, kl_ctl.value, cfg, s)
            m = rl.batch_stats(b, d, b.extra["kl"], scores, golds)
            upd = rl.update(s, t, b, loss_fn, lambda mb: len(mb["lp_tok"]), cfg, step, max_steps)
            clock.lap("update")
            m.update(upd, **clock.take(), beta=kl_ctl.value, **extra)
            kl_ctl.update(m["kl"], len(b.texts) * d.world_size)
            rep.count(len(b.texts) * d.world_size, *rl.step_work(b, d.world_size, forward, train_models,
                                                                 cfg.ppo_epochs))
            done = step + 1
            metrics = rl.record(rep, watch, monitor, m, done, max_steps, policy, ref, tokenizer, cfg, metrics)
            if loop.save_due(s, done, max_steps):
                loop.save(s, t, tokenizer, done, metrics, loader, final=done == max_steps, parent=cfg.model,
                          save_fn=save_policy, state={"kl_coef": kl_ctl.value, "monitor": monitor.state_dict()})
            rep.advance(done)
            if loop.stop_due(s, done):
                break
    if s.is_main and done == max_steps:
        save_reward_model(value, s.out / "value", tokenizer, dtype=torch.float32)
        monitor.plot()
    loop.finish(s)
    return metrics


def save_policy(model: PolicyAndValue, folder, tokenizer, *, state_dict, training_state, **kw):
    """The checkpoint: the policy as a Hugging Face folder; the value model's weights in training_state.pt."""
    pol = {k.removeprefix("policy."): v for k, v in state_dict.items() if k.startswith("policy.")}
    val = {k.removeprefix("value."): v.cpu() for k, v in state_dict.items() if k.startswith("value.")}
    return save_model(model.policy, folder, tokenizer, state_dict=pol,
                      training_state={**training_state, "value": val}, **kw)

