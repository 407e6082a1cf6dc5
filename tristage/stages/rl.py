"""What the RL stages (ppo, grpo) share: prompts, rollouts with their log-probs, rewards, the held-out monitor.

    rows, val = load_prompt_splits(cfg, tokenizer)            # prompt records, checked against the chat template
    loader = PromptLoader(rows, cfg.batch_size, ...)          # endless, epoch-shuffled, resumable, split over ranks
    batch = collect(cfg, s, policy, ref, prompts, k, step)    # sample k answers each; log-probs, entropy, ref log-probs
    monitor = Monitor(cfg, s, ...)                            # held-out reward / gold / KL, curves.png, out/best

Choices, and why:
- Rollouts come from the shared engine (tristage.serve.engine, KV cache, batched) through
  tristage.rollout.sample_answers, one generator per answer seeded by (seed, step, the answer's index in the global
  batch): an answer depends on nothing else, so a run split over two processes samples exactly the answers one
  process would, and a resumed run samples what the uninterrupted one did.
- The log-probs the update compares against (old_logp) are recomputed with a plain forward under the training
  precision, at the sampling temperature (logits / T), not taken from the engine: the engine runs the fp32 model
  token by token, and any difference would make the first update's ratio differ from 1 for no reason. The same pass
  gives the entropy (nats per token) of the tempered distribution.
- A reward model that shares the policy's tokenizer reads each answer's sampled tokens (prompt + answer without its
  stop token + the template's end of turn), as OpenRLHF and verl do, not its decoded text encoded again: what is
  scored is what was sampled, and no decode / encode round trip runs (one that is not exact, such as invalid UTF-8
  coming back as 3-byte replacement characters, would also lengthen the input). A scorer with another tokenizer, or
  a function, reads the texts.
- Flat token layout: a batch's response tokens are kept as one flat list (row-major: answer 0's tokens, then
  answer 1's, ...) with, per token, its row and position in a right-padded [N, T] batch of prompt + answer
  (`Rows`). `padded` turns flat [M] values into [N, Tc] for the estimators that run along time (GAE).
- The monitor (before the first step, every --eval-every steps and at the end) samples one answer per held-out
  prompt at the training temperature with a fixed seed, scores it with the reward (model or function) and, when
  --gold is given, the gold scorer, and measures KL(policy || reference) on those samples (sum over the answer of
  log p - log p_ref). metrics.jsonl gets eval_reward / eval_gold / eval_kl (with standard errors); curves.png
  plots reward and gold against KL, from the starting point at KL 0; out/best keeps the policy with the best
  held-out gold (or reward), which may be the starting one. It warns when the reward has risen since the best
  gold while the gold fell (over-optimisation: the policy exploits the reward model).
- Temperature must be > 0 (a ratio of greedy policies is undefined) and top-k / top-p are not offered: the update
  optimises the tempered distribution the answers were sampled from, and truncation would make it another one.
- RL runs under DDP only: every process generates with its own full copy of the policy; FSDP would need every
  process to take the same number of decoding steps.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from tristage.data.position import advance, resume_position
from tristage.data.records import PromptRow, check_rendering, read_prompt_file, split_train_val
from tristage.eval.judges import ScalarJudge, make_judge
from tristage.flops import flops_per_token, forward_flops_per_token
from tristage.io import UserError, write_json
from tristage.model.hf import save_model
from tristage.rollout import pad_id as pad_id_of
from tristage.rollout import sample_answers, token_logprobs
from tristage.runtime import autocast
from tristage.serve.engine import Engine, SamplingParams
from tristage.train import distributed as dist
from tristage.train import loop
from tristage.train.rl import entropy_from_logits

Messages = list[dict[str, str]]


def check_args(cfg: Any) -> None:
    """Flags that only make sense together; RL's process model (each rank generates on its own copy)."""
    if cfg.parallel != "ddp":
        raise UserError(f"--parallel {cfg.parallel}: the RL stages run under ddp only (every process samples with its "
                        "own copy of the policy)")
    if not cfg.prompts:
        raise UserError("--prompts: no prompt files given")
    if cfg.grad_accum != 1:
        raise UserError(f"--grad-accum {cfg.grad_accum}: the RL stages split each minibatch with --micro-batch-size "
                        "instead (the optimizer steps per rollout batch are --ppo-epochs x --num-minibatches)")


def fit_answer_length(cfg: Any) -> int:
    """The model's context (policy and reference; the smallest), after setting --max-new-tokens when it was not
    given (128, or half the context) and checking that a given one leaves room for a prompt."""
    ctx = loop.fit_max_len(None, cfg.model, *([cfg.ref_model] if cfg.ref_model else []))
    if cfg.max_new_tokens is None:
        cfg.max_new_tokens = min(128, ctx // 2)
    if cfg.max_new_tokens >= ctx:
        raise UserError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in the model's context "
                        f"({ctx} positions)")
    return ctx


# ----------------------------------------------------------------------------- prompts
def load_prompt_splits(cfg: Any, tokenizer: Any, max_prompt_len: int) -> tuple[list[PromptRow], list[PromptRow],
                                                                               list[str]]:
    """(train, held-out, notes): prompt rows from --prompts (and --val-prompts, or --val-fraction of --prompts),
    each checked against the chat template at its file and line; prompts whose rendering has more than
    max_prompt_len tokens are left out and counted (there would be no room to answer)."""
    notes: list[str] = []

    def read(paths: Sequence[str]) -> list[PromptRow]:
        rows: list[PromptRow] = []
        for p in paths:
            got = read_prompt_file(p)
            if not got:
                raise UserError(f"{p}: no prompts")
            check_rendering(tokenizer, got, p)
            keep = [r for r in got if len(tokenizer.apply_chat_template(r.messages, add_generation_prompt=True))
                    <= max_prompt_len]
            if len(keep) < len(got):
                notes.append(f"{p}: {len(got) - len(keep)} prompts longer than {max_prompt_len} tokens left out "
                             "(no room for --max-new-tokens within the model's context)")
            if not keep:
                raise UserError(f"{p}: every prompt is longer than {max_prompt_len} tokens; lower --max-new-tokens")
            rows += keep
        return rows

    train = read(cfg.prompts)
    if cfg.val_prompts:
        return train, read(cfg.val_prompts), notes
    train, val = split_train_val(train, cfg.val_fraction, cfg.seed)
    return train, val, notes


class PromptLoader:
    """Endless rollout batches of prompt rows, reshuffled each epoch, resumable exactly.

    Each epoch's shuffled prompts are cut into global batches of batch_size x world_size (a short last one is
    dropped); rank r takes its slice [r * batch_size, (r + 1) * batch_size), so one process with batch 2B gets
    the prompts two processes with batch B get together, in the same order."""

    def __init__(self, rows: Sequence[PromptRow], batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.rows, self.batch_size, self.seed = list(rows), batch_size, seed
        self.rank, self.world_size = rank, world_size
        if len(self.rows) < batch_size * world_size:
            raise UserError(f"{len(self.rows)} training prompts cannot fill one rollout batch of {batch_size} x "
                            f"{world_size} processes; lower --batch-size")
        self.epoch, self.index = 0, 0

    def steps_per_epoch(self) -> int:
        return len(self.rows) // (self.batch_size * self.world_size)

    def plan(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows)).tolist()
        G, B = self.batch_size * self.world_size, self.batch_size
        return [order[k + self.rank * B:k + (self.rank + 1) * B] for k in range(0, len(order) - G + 1, G)]

    def __next__(self) -> list[PromptRow]:
        batch, self.epoch, self.index = advance(self.plan, self.epoch, self.index)
        return [self.rows[i] for i in batch]

    def settings(self) -> dict[str, Any]:
        return {"seed": self.seed, "batch_size": self.batch_size, "n_prompts": len(self.rows), "rank": self.rank,
                "world_size": self.world_size}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, **self.settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index = resume_position(state, self.settings())


# ----------------------------------------------------------------------------- rollouts
def answer_seed(seed: int, step: int, index: int) -> int:
    """The seed of answer `index` (its place in the global batch) of rollout batch `step`."""
    return (seed * 1_000_003 + step) * 1_000_033 + index


@dataclass
class Rows:
    """N answers in the flat token layout: prompt + answer right-padded into input_ids [N, T]; response token m sits
    at (row[m], pos[m] + 1) and is predicted at (row[m], pos[m]); lengths [N] answer lengths (tokens)."""

    input_ids: Tensor
    row: Tensor
    pos: Tensor
    tok: Tensor
    lengths: Tensor

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad: int,
              device: torch.device) -> Rows:
        seqs = [list(p) + list(a) for p, a in zip(prompts, answers)]
        T = max(len(x) for x in seqs)
        where = [(b, len(p) - 1 + t, tok) for b, (p, a) in enumerate(zip(prompts, answers)) for t, tok in enumerate(a)]
        row, pos, tok = torch.tensor(where, dtype=torch.long).reshape(-1, 3).T
        ids = torch.tensor([x + [pad] * (T - len(x)) for x in seqs], dtype=torch.long)
        return cls(ids.to(device), row.to(device), pos.to(device), tok.to(device),
                   torch.tensor([len(a) for a in answers], device=device))

    def mask(self) -> Tensor:
        """[N, Tc] bool: the real answer tokens of a right-padded [N, Tc] view (Tc = the longest answer)."""
        return torch.arange(int(self.lengths.max()), device=self.lengths.device) < self.lengths[:, None]

    def padded(self, flat: Tensor) -> Tensor:
        """Flat per-token values [M] -> [N, Tc] (0 where there is no token)."""
        m = self.mask()
        out = flat.new_zeros(m.shape)
        out[m] = flat
        return out

    def batch(self) -> dict[str, Tensor]:
        return {"input_ids": self.input_ids, "lp_row": self.row, "lp_pos": self.pos, "lp_tok": self.tok}


def policy_logprobs(model: nn.Module, batch: dict[str, Tensor], temperature: float,
                    entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs [M] (fp32) of a flat-layout batch's answer tokens under softmax(logits / temperature), and with
    `entropy` the entropy [M] of that distribution at each (no gradient through it)."""
    logits = model(batch["input_ids"])[batch["lp_row"], batch["lp_pos"]].float() / temperature
    lp = token_logprobs(logits, batch["lp_tok"])
    ent = entropy_from_logits(logits.detach()) if entropy else None
    return lp, ent


@dataclass
class Rollouts:
    """One process's rollout batch: N = prompts x k answers (the k answers of a prompt are adjacent)."""

    messages: list[Messages]  # per answer, the prompt's messages
    prompt_ids: list[list[int]]
    answer_ids: list[list[int]]
    texts: list[str]
    stopped: list[bool]  # ended its turn (a stop token) rather than at --max-new-tokens
    rows: Rows
    old_logp: Tensor | None  # [M] under the policy that sampled them, at the sampling temperature (None: skipped)
    ref_logp: Tensor | None  # [M] under the reference, same temperature
    entropy: Tensor | None  # [M] (None with old_logp)
    extra: dict[str, Tensor] = field(default_factory=dict)  # per-token or per-answer tensors a stage adds

    def micro_batches(self, order: Sequence[int], size: int) -> list[dict[str, Any]]:
        """The answers `order` in micro-batches of `size`, each in the flat layout with every per-token tensor
        (old_logp when it was computed, ref_logp and the stage's per-token `extra`) cut to its tokens."""
        starts = torch.cat([torch.zeros(1, dtype=torch.long), self.rows.lengths.cpu().cumsum(0)]).tolist()
        out = []
        for k in range(0, len(order), size):
            idx = list(order[k:k + size])
            dev = self.rows.tok.device
            tok = torch.cat([torch.arange(starts[i], starts[i + 1]) for i in idx]).to(dev)
            rows = Rows.build([self.prompt_ids[i] for i in idx], [self.answer_ids[i] for i in idx], self.pad, dev)
            mb: dict[str, Any] = {**rows.batch(), "seq_len": rows.lengths[rows.row].float(), "n_seqs": len(idx)}
            if self.old_logp is not None:
                mb["old_logp"] = self.old_logp[tok]
            if self.ref_logp is not None:
                mb["ref_logp"] = self.ref_logp[tok]
            M = len(self.rows.tok)
            for name, x in self.extra.items():
                if x.shape[0] == M:
                    mb[name] = x[tok]
            out.append(mb)
        return out

    pad: int = 0


def step_work(b: Rollouts, world_size: int, forward: Sequence[tuple[Any, bool]], train: Sequence[tuple[Any, bool]],
              epochs: int) -> tuple[int, float]:
    """(tokens, model FLOPs) of one RL step on all processes (this process's times world_size): the rollouts' prompt
    + answer tokens once through each `forward` model (generation counts as one pass of the policy, then the log-prob,
    reward and value passes) and `epochs` training passes through each `train` model; models as (ModelConfig,
    has an lm_head). PaLM's convention at the batch's mean sequence length; the held-out monitor is not counted."""
    lengths = [len(p) + len(a) for p, a in zip(b.prompt_ids, b.answer_ids)]
    tokens, seq = sum(lengths), round(statistics.fmean(lengths))
    flops = sum(forward_flops_per_token(c, seq, lm_head) for c, lm_head in forward) + \
        epochs * sum(flops_per_token(c, seq, lm_head=lm_head) for c, lm_head in train)
    return tokens * world_size, tokens * flops * world_size


class Clock:
    """Seconds spent in each phase of a step (generate, logprobs, score, update): where the time goes. A step's
    time_other is what ran between the previous step's update and this one's rollout: logging, and the held-out
    monitor and checkpoint of the previous step when they were due."""

    def __init__(self) -> None:
        self.t, self.spent = time.perf_counter(), {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.spent[f"time_{phase}"] = self.spent.get(f"time_{phase}", 0.0) + now - self.t
        self.t = now

    def take(self) -> dict[str, float]:
        out, self.spent = self.spent, {}
        return out


def collect(policy: nn.Module, ref: nn.Module | None, tokenizer: Any, stop_ids: list[int], rows: Sequence[PromptRow],
            k: int, step: int, first_index: int, cfg: Any, s: loop.Session, clock: Clock | None = None,
            policy_pass: bool = True) -> Rollouts:
    """Sample k answers to each prompt (seeded per answer), then one no-grad pass for their log-probs and entropy
    under the policy (unless not `policy_pass`: a stage whose only update is one optimizer step takes them from that
    step's own forward) and, if given, the reference (both at the sampling temperature, in the training precision)."""
    gens = [torch.Generator(s.device).manual_seed(answer_seed(cfg.seed, step, first_index + i))
            for i in range(len(rows) * k)]
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, stop_ids=stop_ids)
    groups = sample_answers(Engine(policy), tokenizer, [r.messages for r in rows], k, params, gens)
    if clock is not None:
        clock.lap("generate")
    flat = [(r, x) for r, xs in zip(rows, groups) for x in xs]
    pad = pad_id_of(tokenizer)
    # an empty answer (a stop token first) keeps that token, so every answer has >= 1 token to learn from
    answers = [x.tokens for _, x in flat]
    built = Rows.build([x.prompt for _, x in flat], answers, pad, s.device)
    with torch.no_grad(), autocast(s.device, s.dtype):
        old, ent = (policy_logprobs(policy, built.batch(), cfg.temperature, entropy=True) if policy_pass
                    else (None, None))
        ref_lp = policy_logprobs(ref, built.batch(), cfg.temperature)[0] if ref is not None else None
    if clock is not None:
        clock.lap("logprobs")
    return Rollouts([r.messages for r, _ in flat], [x.prompt for _, x in flat], answers, [x.text for _, x in flat],
                    [x.finish_reason == "stop" for _, x in flat], built, old, ref_lp, ent, pad=pad)  # type: ignore


def score(judge: ScalarJudge, b: Rollouts, k: int, s: loop.Session, tokenizer: Any) -> list[float]:
    """The judge's score of every answer of `b` (k adjacent answers per prompt), flat. A reward model that shares
    the policy's tokenizer reads the sampled tokens themselves (`RewardJudge.scores_sampled`), any other judge the
    decoded texts; a reward model runs under the training precision's autocast (its weights stay fp32), as the
    policy's and reference's passes do."""
    prompts = b.messages[::k]
    cut = [slice(i, i + k) for i in range(0, len(b.texts), k)]
    with torch.no_grad(), autocast(s.device, s.dtype):
        got = None
        if hasattr(judge, "scores_sampled"):
            got = judge.scores_sampled(prompts, b.prompt_ids[::k], [b.answer_ids[c] for c in cut],
                                       [b.stopped[c] for c in cut], tokenizer)
        if got is None:
            got = judge.scores(prompts, [b.texts[c] for c in cut])
        return [float(x) for g in got for x in g]


def global_mean_var(x: Tensor, d: dist.Dist) -> tuple[Tensor, Tensor]:
    """Mean and unbiased variance of every process's x [M] together (two passes, as masked_var on one process)."""
    n = dist.all_reduce_sum(torch.tensor([float(x.numel()), float(x.sum())], dtype=torch.float64, device=x.device), d)
    mean = n[1] / n[0]
    ss = dist.all_reduce_sum(((x.double() - mean) ** 2).sum(), d)
    var = ss / (n[0] - 1) if n[0] >= 2 else ss / n[0].clamp(min=1)
    return mean.to(x.dtype), var.to(x.dtype)


def batch_stats(b: Rollouts, d: dist.Dist, kl_tok: Tensor | None, rewards: Sequence[float],
                gold: Sequence[float] | None) -> dict[str, float]:
    """Means over the global batch: reward, gold, KL per answer (sum of k1), entropy per token, answer length,
    share that ended their turn, share of distinct answers."""
    L = b.rows.lengths.double()
    kl_seq = torch.zeros(len(L), dtype=torch.float64, device=L.device)
    if kl_tok is not None:
        kl_seq = kl_seq.index_add(0, b.rows.row, kl_tok.double())
    N = float(len(L))
    distinct = float(len(set(b.texts)))
    vals = [N, sum(rewards), sum(gold) if gold is not None else 0.0, float(kl_seq.sum()), float((kl_seq ** 2).sum()),
            float(b.entropy.double().sum()), float(L.sum()), float(sum(b.stopped)), distinct]
    tot = dist.all_reduce_sum(torch.tensor(vals, dtype=torch.float64, device=L.device), d).tolist()
    n = tot[0]
    out = {"reward": tot[1] / n, "kl": tot[3] / n, "entropy": tot[5] / max(tot[6], 1), "length": tot[6] / n,
           "stop_rate": tot[7] / n, "distinct": tot[8] / n}
    out["kl_stderr"] = math.sqrt(max(tot[4] / n - out["kl"] ** 2, 0.0) / max(n - 1, 1))
    if gold is not None:
        out["gold"] = tot[2] / n
    return out


# ----------------------------------------------------------------------------- warnings in plain words
class Watch:
    """Warn once per kind when an RL run goes wrong while every number stays finite."""

    def __init__(self, rep: loop.Reporter):
        self.rep, self.first, self.warned = rep, None, set()

    def say(self, kind: str, text: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            self.rep.print(f"[bold red]warning:[/] {text}")

    def check(self, step: int, m: dict[str, float]) -> None:
        if self.first is None:
            self.first = dict(m)
        f = self.first
        if m["kl"] < -max(0.1, 3 * m.get("kl_stderr", 0.0)):  # far below 0: noise alone rarely gets there
            self.say("kl", f"the KL to the reference is negative at step {step} ({m['kl']:.3f} nats per answer): "
                           "the answers are not samples of the policy being scored (a temperature or sampling "
                           "mismatch?); KL estimates below zero mean the numbers cannot be trusted")
        if m.get("ratio_max", 1.0) > 10 or abs(m.get("ratio", 1.0) - 1) > 0.2:
            self.say("ratio", f"the probability ratio drifted far from 1 at step {step} (mean {m.get('ratio', 1):.3f},"
                              f" max {m.get('ratio_max', 1):.3g}): updates are too large for the clip range (lower "
                              "--lr, --ppo-epochs or raise --num-minibatches)")
        if m["length"] < 0.3 * f["length"] and f["length"] >= 4:
            self.say("length", f"answers collapsed in length at step {step}: {m['length']:.1f} tokens, from "
                               f"{f['length']:.1f} at the start (the reward favours short answers, or the policy "
                               "learned to stop at once)")
        if m["distinct"] < 0.5 * f["distinct"]:
            self.say("diversity", f"answers collapsed in diversity at step {step}: {m['distinct']:.0%} of the "
                                  f"batch's answers are distinct, from {f['distinct']:.0%} at the start (mode "
                                  "collapse; raise the KL coefficient?)")


# ----------------------------------------------------------------------------- the held-out monitor
def stderr(xs: Sequence[float]) -> float:
    """The standard error of the mean of xs (0 for fewer than two)."""
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0


class Monitor:
    """Held-out reward, gold and KL every --eval-every steps; curves.png; the best policy in out/best."""

    def __init__(self, cfg: Any, s: loop.Session, val: list[PromptRow], reward: ScalarJudge, gold: ScalarJudge | None,
                 tokenizer: Any, stop_ids: list[int]):
        self.cfg, self.s, self.val, self.reward, self.gold = cfg, s, val[:cfg.eval_prompts], reward, gold
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.history: list[dict[str, float]] = []
        self.best: float | None = None
        self.best_at: dict[str, float] | None = None
        self.warned = False

    def run(self, step: int, policy: nn.Module, ref: nn.Module | None) -> dict[str, float]:
        """Every process answers the same held-out prompts (cheap at this size; no gather needed)."""
        if not self.val:
            return {}
        b = collect(policy, ref, self.tokenizer, self.stop_ids, self.val, 1, 10**9, 0, self.cfg, self.s)
        r = score(self.reward, b, 1, self.s, self.tokenizer)
        g = score(self.gold, b, 1, self.s, self.tokenizer) if self.gold is not None else None
        kl = b.old_logp - b.ref_logp if b.ref_logp is not None else torch.zeros_like(b.old_logp)
        kl_seq = torch.zeros(len(b.texts), device=kl.device).index_add(0, b.rows.row, kl.float())
        out = {"eval_reward": statistics.fmean(r), "eval_reward_stderr": stderr(r), "eval_kl": float(kl_seq.mean()),
               "eval_length": float(b.rows.lengths.float().mean()), "eval_stop_rate": statistics.fmean(b.stopped)}
        if g is not None:
            out["eval_gold"] = statistics.fmean(g)
            out["eval_gold_stderr"] = stderr(g)
        self.history.append({"step": step, **out})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best": self.best, "best_at": self.best_at}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history, self.best, self.best_at = list(state["history"]), state["best"], state["best_at"]

    def over_optimised(self, m: dict[str, float]) -> str | None:
        """A warning when the held-out reward rose since the eval with the best gold while the gold fell."""
        if "eval_gold" not in m or self.best_at is None:
            return None
        b = self.best_at
        drop = b["eval_gold"] - m["eval_gold"]
        if m["eval_reward"] > b["eval_reward"] and drop > max(0.01, 2 * m.get("eval_gold_stderr", 0.0)):
            return (f"over-optimisation: the held-out reward rose from {b['eval_reward']:.3f} (step {int(b['step'])}) "
                    f"to {m['eval_reward']:.3f} while the gold score fell from {b['eval_gold']:.3f} to "
                    f"{m['eval_gold']:.3f}; the policy is exploiting the reward model (out/best keeps step "
                    f"{int(b['step'])}; raise the KL coefficient or stop earlier)")
        return None

    def keep_best(self, step: int, m: dict[str, float], policy: nn.Module, tokenizer: Any, meta: dict[str, Any]
                  ) -> bool:
        """Save the policy to out/best when its held-out gold (else reward) is the best so far (main process)."""
        key = "eval_gold" if "eval_gold" in m else "eval_reward"
        if key not in m or (self.best is not None and m[key] <= self.best):
            return False
        self.best, self.best_at = m[key], {"step": step, **m}
        if self.s.is_main:
            save_model(policy, self.s.out / "best", tokenizer, dtype=torch.float32,
                       meta={**meta, "step": step, "selected_by": key, **{k: v for k, v in m.items()}})
        return True

    def plot(self) -> Path | None:
        """out/curves.png: held-out reward and gold against KL (main process; None without matplotlib)."""
        if not self.s.is_main or not self.history:
            return None
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # the plot extra is optional
            return None
        h = self.history
        kl = [x["eval_kl"] for x in h]
        panels = [("eval_reward", "reward (held-out)")] + ([("eval_gold", "gold (held-out)")] if "eval_gold" in h[0]
                                                           else [])
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (key, title) in zip(axes[0], panels):
            err = [x.get(f"{key}_stderr", 0.0) for x in h]
            ax.errorbar(kl, [x[key] for x in h], yerr=err if any(err) else None, fmt="o-", capsize=3)
            for x in (h[0], h[-1]):
                ax.annotate(f"step {int(x['step'])}", (x["eval_kl"], x[key]), fontsize=8)
            ax.set_xlabel("KL(policy || reference), nats per answer")
            ax.set_title(title)
        fig.tight_layout()
        path = self.s.out / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        write_json(self.s.out / "curves.json", h)
        return path


def monitor_step(monitor: Monitor, rep: loop.Reporter, watch: Watch, step: int, policy: nn.Module,
                 ref: nn.Module | None, tokenizer: Any, cfg: Any) -> dict[str, float]:
    """Run the held-out monitor at `step`: record and print its figures, warn on over-optimisation, keep the best
    policy in out/best and redraw curves.png. Returns the eval_* metrics."""
    m = monitor.run(step, policy, ref)
    if not m:
        return {}
    rep.record(step, m)
    gold = f", gold {m['eval_gold']:.3f}" if "eval_gold" in m else ""
    rep.print(f"step {step}: held-out reward {m['eval_reward']:.3f}{gold}, KL {m['eval_kl']:.2f} nats/answer, "
              f"{m['eval_length']:.0f} tokens, ends its turn {m['eval_stop_rate']:.0%}")
    if text := monitor.over_optimised(m):
        watch.say("overopt", text)
    monitor.keep_best(step, m, policy, tokenizer, {"stage": monitor.s.stage, "parent": cfg.model})
    monitor.plot()
    return m


def update(s: loop.Session, t: loop.Trainee, b: Rollouts, loss_fn: loop.LossFn, count: Any, cfg: Any, step: int,
           max_steps: int) -> dict[str, float]:
    """The optimizer steps on one rollout batch: --ppo-epochs passes over --num-minibatches minibatches, each one
    `loop.train_step` (micro-batches of --micro-batch-size answers). loss_fn's statistics must include "ratio_max".
    Returns every statistic averaged over the steps, "ratio_first" (the first minibatch's mean ratio: 1 unless
    something differs between sampling and training) and "ratio_max" (the largest ratio on any process)."""
    per_step = cfg.ppo_epochs * cfg.num_minibatches
    peak: list[float] = []

    def fn(model: nn.Module, mb: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        loss, stats = loss_fn(model, mb)
        peak.append(float(stats.pop("ratio_max")))
        return loss, stats

    out: dict[str, float] = {}
    for epoch in range(cfg.ppo_epochs):
        for j, order in enumerate(minibatch_orders(len(b.texts), cfg.num_minibatches, cfg.seed, step, epoch,
                                                   s.d.rank)):
            u = loop.train_step(s, t, b.micro_batches(order, cfg.micro_batch_size or len(order)), fn, count,
                                step * per_step + epoch * cfg.num_minibatches + j, max_steps * per_step)
            out.setdefault("ratio_first", u["ratio"])
            for key, v in u.items():
                if key != "count":
                    out[key] = out.get(key, 0.0) + v / per_step
    return {**out, "ratio_max": global_max(max(peak), s.d)}


def record(rep: loop.Reporter, watch: Watch, monitor: Monitor, m: dict[str, float], done: int, max_steps: int,
           policy: nn.Module, ref: nn.Module, tokenizer: Any, cfg: Any, metrics: dict[str, Any]) -> dict[str, Any]:
    """After a step: warnings, metrics.jsonl and the progress bar every --log-every steps, the held-out monitor every
    --eval-every steps. Returns the metrics to store with the next checkpoint."""
    watch.check(done, m)
    if loop.due(done, cfg.log_every, max_steps):
        metrics = {**m, "answers_per_s": rep.rate(), **rep.work()}
        rep.record(done, metrics, f"reward {m['reward']:.3f}  KL {m['kl']:.2f}" +
                   (f"  gold {m['gold']:.3f}" if "gold" in m else ""))
    if loop.due(done, cfg.eval_every, max_steps):
        metrics = {**metrics, **monitor_step(monitor, rep, watch, done, policy, ref, tokenizer, cfg)}
    return metrics


def global_max(x: float, d: dist.Dist) -> float:
    """The largest of every process's x."""
    if not d.enabled:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=d.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return float(t.item())


def scorer_model(judge: ScalarJudge) -> list[tuple[Any, bool]]:
    """The model a scorer runs, as step_work's (config, lm_head) list: a reward model's; none for a function."""
    rm = getattr(judge, "rm", None)
    return [(rm.config, False)] if rm is not None else []


def make_scorer(spec: str, s: loop.Session, max_len: int, flag: str) -> ScalarJudge:
    """A scalar judge for --reward / --gold (rm:PATH or a reward-model folder, gold, python:MODULE:FUNCTION)."""
    if Path(spec).is_dir():
        spec = f"rm:{spec}"
    try:
        judge = make_judge(spec, device=s.device, dtype=torch.float32, max_len=max_len)
    except UserError as e:
        raise UserError(f"{flag} {spec}: {str(e).removeprefix(f'--judge {spec!r}: ')}") from None
    if not hasattr(judge, "scores"):
        raise UserError(f"{flag} {spec}: a scalar scorer is needed (rm:PATH, gold, python:MODULE:FUNCTION), not a "
                        "pairwise judge")
    return judge  # type: ignore[return-value]


def minibatch_orders(n: int, num_minibatches: int, seed: int, step: int, epoch: int, rank: int) -> list[list[int]]:
    """This process's answers split into minibatches: in order for one minibatch (so a run on two processes
    equals one on one), else a seeded shuffle per (step, epoch, rank)."""
    if num_minibatches > n:
        raise UserError(f"--num-minibatches {num_minibatches} > {n} answers per process in a rollout batch")
    order = list(range(n))
    if num_minibatches > 1:
        random.Random(answer_seed(seed, step, epoch * 1000 + rank)).shuffle(order)
    size = math.ceil(n / num_minibatches)
    return [order[i:i + size] for i in range(0, n, size)]
