"""Parity with TRL: our preference losses, sequence log-probs and rewards against TRL's own code on identical inputs.

The checks of bench/bench_preference.py's `parity` part, as tests, so that every run guards them (trl is in the
`test` extra; the module is skipped where trl is absent). The setup is a smaller copy of the bench's: the tests'
char tokenizer with our ChatML template, a tiny tristage GPT saved as a Hugging Face folder (`model`, the
reference), a perturbed copy (`policy`: with policy == reference every DPO loss is log 2 and tests nothing), a
reward model with our score head on the same backbone, and pairs in TRL's conversational shape. TRL reads its
standard (text) format built from the same records (prompt rendered by our template, reply + `<|im_end|>`, eos set
to `<|im_end|>` so TRL appends nothing), which gives exactly our tokens (checked first).

Tolerances as in the bench: 1e-5 absolute, or 1e-6 x the largest |value| for fp32 sums over many tokens. The
checks call TRL's loss code directly (DPOTrainer._compute_loss, CPOTrainer.cpo_loss, ORPOTrainer.odds_ratio_loss,
RewardTrainer.compute_loss), as the bench does; pyproject.toml pins the TRL minor release they were written for.
"""

from __future__ import annotations

import json
import random
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_config

pytest.importorskip("trl")
pytest.importorskip("datasets")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]  # slow: building TRL's trainers takes ~15 s

N_PAIRS, BATCH, MAX_LEN, BETA, TOL = 16, 8, 256, 0.1, 1e-5
END = "<|im_end|>"
ANIMALS, PLACES = ["dog", "cat", "bird", "fish", "cow", "owl"], ["mat", "porch", "patio", "pond", "barn", "roof"]


def assert_close(ours, theirs, rel: float | None = None) -> None:
    """max |ours - theirs| <= TOL, or <= rel x the largest |theirs| (NaN fails)."""
    a, b = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(theirs, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    tol = TOL if rel is None else rel * b.abs().max().item()
    diff = (a - b).abs().max().item()
    assert diff <= tol, f"max abs difference {diff:.2e} > {tol:.1e}"


def make_pairs() -> list[dict]:
    """Pairs in TRL's conversational shape; some prompts have a system message or an earlier exchange."""
    rng = random.Random(0)
    out = []
    for k in range(N_PAIRS):
        a, p = rng.choice(ANIMALS), rng.choice(PLACES)
        wrong = rng.choice([q for q in PLACES if q != p])
        prompt = [{"role": "user", "content": f"where did the {a} sit?"}]
        if k % 4 == 1:
            prompt.insert(0, {"role": "system", "content": "answer in one sentence."})
        if k % 4 == 2:
            prompt = [{"role": "user", "content": "hello."}, {"role": "assistant", "content": "hello, friend."},
                      *prompt]
        tail = " it was warm." * rng.randint(0, 2)
        out.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": f"the {a} sat on the {p}.{tail}"}],
                    "rejected": [{"role": "assistant", "content": f"the {a} sat on the {wrong}."}]})
    return out


def trl_rows(hf_tok, recs: list[dict], fmt: str) -> list[dict]:
    """TRL's rows: 'conv' as is; 'text' = the prompt rendered by our template + reply + <|im_end|>."""
    if fmt == "conv":
        return recs
    return [{"prompt": hf_tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False),
             "chosen": r["chosen"][0]["content"] + END, "rejected": r["rejected"][0]["content"] + END} for r in recs]


# ----------------------------------------------------------------------------- TRL's loss code on given log-probs
class StubLM(torch.nn.Module):
    """Stands in for TRL's fused-head model: returns per-token log-probs whose row sums are the given values."""

    def __init__(self, seq_logps: torch.Tensor, width: int):
        super().__init__()
        self.per_token = torch.zeros(len(seq_logps), width)
        self.per_token[:, 0] = seq_logps  # zeros elsewhere: the sum over the row is exactly this value

    def forward(self, **_):
        z = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=z, mean_logits=z, is_top1=z.bool(), aux_loss=None)


def stub_batch(chosen_len: torch.Tensor, rejected_len: torch.Tensor, prompt: int = 4) -> dict:
    """A TRL DPO batch (2B rows) whose completion masks have the given lengths."""
    lens = torch.cat([chosen_len, rejected_len]).long()
    T = prompt + int(lens.max())
    cm = torch.zeros(len(lens), T, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        cm[i, prompt:prompt + n] = 1
    am = ((torch.arange(T) < prompt) | cm.bool()).long()
    return {"input_ids": torch.zeros(len(lens), T, dtype=torch.long), "attention_mask": am, "completion_mask": cm}


def trl_dpo_loss(trainer, c, r, rc, rr, lc, lr, loss_type: str, beta: float) -> tuple[torch.Tensor, dict]:
    """TRL DPOTrainer._compute_loss on given summed log-probs: per-pair losses (one call per pair) and the metrics
    TRL logs for the whole batch (rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies)."""
    trainer.loss_types, trainer.loss_weights, trainer.beta = [loss_type], [1.0], beta
    trainer.precompute_ref_logps = True  # read the reference log-probs from the batch

    def call(idx):
        batch = stub_batch(lc[idx], lr[idx])
        batch["ref_chosen_logps"], batch["ref_rejected_logps"] = rc[idx], rr[idx]
        stub = StubLM(torch.cat([c[idx], r[idx]]), batch["input_ids"].shape[1] - 1)
        with torch.no_grad():
            return trainer._compute_loss(stub, batch, False)

    try:
        per_pair = torch.stack([call(torch.tensor([i])) for i in range(len(c))])
        mode = "train" if trainer.model.training else "eval"
        trainer._metrics[mode].clear()
        mean = call(torch.arange(len(c)))
        m = {k: trainer._metrics[mode][k][-1] for k in ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                                        "rewards/accuracies")}
    finally:
        trainer.precompute_ref_logps = False
    return per_pair, {"mean": mean.item(), **m}


def input_sets(model_set: dict) -> dict[str, dict]:
    """Per-sequence log-probs fed to both sides: from the models, random, and near-certain answers."""
    g = torch.Generator().manual_seed(0)
    n = 256
    lc, lr = torch.randint(1, 61, (n,), generator=g).float(), torch.randint(1, 61, (n,), generator=g).float()
    rc, rr = -lc * (2 + 2.5 * torch.rand(n, generator=g)), -lr * (2 + 2.5 * torch.rand(n, generator=g))
    # policy = reference + N(0, 8^2), kept a valid log-prob (mean token log-prob <= -0.05)
    c = torch.minimum(rc + 8 * torch.randn(n, generator=g), -0.05 * lc)
    r = torch.minimum(rr + 8 * torch.randn(n, generator=g), -0.05 * lr)
    sets = {"model": model_set, "random": dict(c=c, r=r, rc=rc, rr=rr, lc=lc, lr=lr)}
    # near-certain answers: mean token log-prob in [-0.01, -1e-4] (a well-fitted model); reference-free losses only
    ac, ar = -10 ** (-2 - 2 * torch.rand(n, generator=g)), -10 ** (-2 - 2 * torch.rand(n, generator=g))
    sets["near-certain"] = dict(c=ac * lc, r=ar * lr, rc=None, rr=None, lc=lc, lr=lr)
    return sets


# ----------------------------------------------------------------------------- setup (once for the module)
@pytest.fixture(scope="module")
def world(tiny_shards, tmp_path_factory):
    """Model folders, pairs, our encoded pairs, TRL's DPO and reward trainers, and the DPO batch's log-probs.
    TRL's trainers seed the global RNGs: their state is restored afterwards so later tests see no difference."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from tristage.data.preference import collate_pairs, encode_preferences, load_preferences
    from tristage.model.gpt import build_model
    from tristage.model.hf import load_model, save_model
    from tristage.model.score import from_causal_lm, save_reward_model
    from tristage.rollout import batch_logprobs
    from tristage.tokenizer import Tokenizer

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    work = tmp_path_factory.mktemp("trl_parity")
    tok = Tokenizer.load(tiny_shards / "tokenizer")
    cfg = tiny_config(tok, max_position_embeddings=MAX_LEN)
    save_model(build_model(cfg, seed=0), work / "model", tok, dtype=torch.float32)
    policy = build_model(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    save_model(policy, work / "policy", tok, dtype=torch.float32)
    save_reward_model(from_causal_lm(build_model(cfg, seed=0), 1, seed=0), work / "rm", tok, dtype=torch.float32)
    recs = make_pairs()
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    prefs, _ = load_preferences(work / "pairs.jsonl")
    ex, stats = encode_preferences(tok, prefs, MAX_LEN)
    assert stats.pairs == N_PAIRS and stats.truncated == 0 and max(len(e.chosen_ids) for e in ex) < MAX_LEN
    hf_tok = AutoTokenizer.from_pretrained(work / "model")
    hf_tok.eos_token = END

    common = dict(per_device_train_batch_size=BATCH, max_length=MAX_LEN, use_cpu=True, bf16=False,
                  gradient_checkpointing=False, report_to="none", save_strategy="no", disable_tqdm=True, seed=0)
    try:
        with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mp.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
            mp.chdir(work)  # anything TRL writes lands here
            load = dict(dtype=torch.float32, attn_implementation="sdpa")
            args = DPOConfig(output_dir=str(work / "dpo"), beta=BETA, **common)
            dpo = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(work / "policy", **load),
                             ref_model=AutoModelForCausalLM.from_pretrained(work / "model", **load), args=args,
                             train_dataset=Dataset.from_list(trl_rows(hf_tok, recs, "text")), processing_class=hf_tok)
            conv = dpo._prepare_dataset(Dataset.from_list(trl_rows(hf_tok, recs, "conv")), hf_tok, args, "conv")
            rtrainer = RewardTrainer(model=AutoModelForSequenceClassification.from_pretrained(work / "rm", **load),
                                     args=RewardConfig(output_dir=str(work / "rm_run"), **common),
                                     train_dataset=Dataset.from_list(trl_rows(hf_tok, recs, "text")),
                                     processing_class=hf_tok)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])

    ds = dpo.train_dataset
    batch = dpo.data_collator([ds[i] for i in range(BATCH)])
    ob = collate_pairs(ex[:BATCH], tok.pad_id)
    ours_pol = load_model(work / "policy", dtype=torch.float32)
    ours_ref = load_model(work / "model", dtype=torch.float32)
    with torch.no_grad():
        pc, pr = dpo.compute_ref_log_probs(dpo.model, batch)
        rc, rr = dpo.compute_ref_log_probs(dpo.ref_model, batch)
        lp, n = batch_logprobs(ours_pol, ob)
        lp_ref, _ = batch_logprobs(ours_ref, ob)
    lc, lr = (x.sum(1).float() for x in batch["completion_mask"].chunk(2))
    return SimpleNamespace(work=work, tok=tok, hf_tok=hf_tok, ex=ex, dpo=dpo, dpo_args=args, conv=conv,
                           rtrainer=rtrainer, batch=batch, ob=ob, ours_pol=ours_pol, lp=lp, n=n, lp_ref=lp_ref,
                           trl_logps=dict(c=pc, r=pr, rc=rc, rr=rr, lc=lc, lr=lr))


# ----------------------------------------------------------------------------- tokens
def test_trl_tokenizes_pairs_as_we_do(world):
    """TRL's text format gives our ids and scored positions for every pair; its conversational format scores one
    token more per reply (the newline after <|im_end|>); RewardTrainer's rows are our ids."""
    ex, ds, rds = world.ex, world.dpo.train_dataset, world.rtrainer.train_dataset
    nl = world.hf_tok("\n", add_special_tokens=False)["input_ids"]
    assert len(ex) == len(ds) == len(world.conv) == len(rds) == N_PAIRS and len(nl) == 1

    def same(d, extra):
        for i, e in enumerate(ex):
            p = d[i]["prompt_ids"]
            assert p + d[i]["chosen_ids"] == e.chosen_ids + extra and p + d[i]["rejected_ids"] == e.rejected_ids + extra
            assert [0] * len(p) + [1] * (len(d[i]["chosen_ids"]) - len(extra)) == e.chosen_mask
            assert [0] * len(p) + [1] * (len(d[i]["rejected_ids"]) - len(extra)) == e.rejected_mask

    same(ds, [])
    same(world.conv, nl)
    assert all(rds[i]["chosen_ids"] == e.chosen_ids and rds[i]["rejected_ids"] == e.rejected_ids
               for i, e in enumerate(ex))


# ----------------------------------------------------------------------------- DPO pipeline
def test_sequence_logprobs_match_trl(world):
    """Per-token and summed reply log-probs of a real batch, policy and reference, both pair layouts."""
    from tristage.data.preference import collate_pairs_shared
    from tristage.rollout import batch_logprobs

    t, batch, ob = world.trl_logps, world.batch, world.ob
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        # TRL's fused-head forward, as in its _compute_loss; ours: the log_softmax + gather of `sequence_logprobs`
        trl_tok = world.dpo.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False, labels=labels, fused_lm_head=True).log_probs
        y = ob["labels"]
        ours_tok = torch.log_softmax(world.ours_pol(ob["input_ids"]).float(), -1).gather(
            -1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (y != -100)
        packed = collate_pairs_shared(world.ex[:BATCH], world.tok.pad_id, pack=True)
        lp_packed, n_packed = batch_logprobs(world.ours_pol, packed)
    assert_close(ours_tok[:, :trl_tok.shape[1]], trl_tok)
    assert_close(world.lp, torch.cat([t["c"], t["r"]]), rel=1e-6)
    assert_close(world.lp_ref, torch.cat([t["rc"], t["rr"]]), rel=1e-6)
    assert_close(lp_packed, torch.cat([t["c"], t["r"]]), rel=1e-6)
    assert_close(world.n, torch.cat([t["lc"], t["lr"]]))
    assert_close(n_packed, torch.cat([t["lc"], t["lr"]]))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_first_step_loss_matches_trl(world, loss_type):
    """TRL's compute_loss on the policy/reference batch vs our DPO stage's losses on our log-probs."""
    from tristage.stages import dpo as sdpo

    trainer = world.dpo
    trainer.loss_types, trainer.loss_weights, trainer.beta = [loss_type], [1.0], BETA
    with torch.no_grad():
        trl_first = trainer.compute_loss(trainer.model, dict(world.batch))
    ours = sdpo.losses(world.lp, world.n, world.lp_ref, BATCH, sdpo.Config(model="-", loss=loss_type, beta=BETA))
    assert_close(ours[0].mean(), trl_first)


# ----------------------------------------------------------------------------- loss formulas
@pytest.mark.parametrize("inputs", ["model", "random", "near-certain"])
def test_dpo_family_losses_match_trl(world, inputs):
    """DPO, IPO, conservative DPO, SimPO and ORPO on identical per-sequence log-probs (256 pairs, or the model
    batch's): per pair, batch means and the implicit rewards TRL logs."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    from tristage.train.losses import dpo_loss

    s = input_sets(world.trl_logps)[inputs]
    c, r, rc, rr, lc, lr = s["c"], s["r"], s["rc"], s["rr"], s["lc"], s["lr"]
    ns = SimpleNamespace(alpha=0.0, accelerator=SimpleNamespace(device="cpu"))
    if rc is not None:
        for loss_type, beta in (("sigmoid", BETA), ("ipo", BETA), ("ipo", 0.5)):
            per, m = trl_dpo_loss(world.dpo, c, r, rc, rr, lc, lr, loss_type, beta)
            ours, ch, rj = dpo_loss(c, r, rc, rr, chosen_len=lc, rejected_len=lr, beta=beta, loss_type=loss_type)
            assert_close(ours, per)
            assert_close(ours.mean(), m["mean"])
            if loss_type == "sigmoid":
                assert_close([ch.mean(), rj.mean(), (ch - rj).mean(), (ch > rj).float().mean()],
                             [m["rewards/chosen"], m["rewards/rejected"], m["rewards/margins"],
                              m["rewards/accuracies"]])
        # conservative DPO = TRL CPO's sigmoid loss with label smoothing on the reference log-ratios
        cns = SimpleNamespace(**vars(ns), loss_type="sigmoid", beta=BETA, label_smoothing=0.1, simpo_gamma=0.5)
        trl_l, _, _ = CPOTrainer.cpo_loss(cns, c - rc, r - rr)
        ours, _, _ = dpo_loss(c, r, rc, rr, beta=BETA, loss_type="sigmoid", label_smoothing=0.1)
        assert_close(ours, trl_l)
    avg_c, avg_r = c / lc, r / lr
    for ls in (0.0, 0.1):
        sns = SimpleNamespace(**vars(ns), loss_type="simpo", beta=2.0, label_smoothing=ls, simpo_gamma=0.5)
        trl_l, trl_ch, trl_rj = CPOTrainer.cpo_loss(sns, avg_c, avg_r)
        ours, ch, rj = dpo_loss(c, r, None, None, chosen_len=lc, rejected_len=lr, beta=2.0, loss_type="simpo",
                                gamma=0.5, label_smoothing=ls)
        assert_close(ours, trl_l)
        if ls == 0.0:
            assert_close(torch.cat([ch, rj]), torch.cat([trl_ch, trl_rj]))
    # ORPO: NLL term = -mean reply log-prob of the chosen side, odds-ratio term as ORPOTrainer.odds_ratio_loss
    ratio = ORPOTrainer.odds_ratio_loss(SimpleNamespace(**vars(ns), beta=BETA), avg_c, avg_r)[0]
    ours, _, _ = dpo_loss(c, r, None, None, chosen_len=lc, rejected_len=lr, beta=BETA, loss_type="orpo")
    assert_close(ours, -avg_c - ratio)


# ----------------------------------------------------------------------------- reward model
def test_rewards_and_bradley_terry_loss_match_trl(world):
    """LlamaForSequenceClassification (same weights) vs our reward model in both layouts, and RewardTrainer's
    Bradley-Terry loss (with and without centering and margins) vs ours, on TRL's rewards and on our pipeline's."""
    from tristage.data.preference import collate_pairs_shared
    from tristage.model.score import load_reward_model
    from tristage.stages import reward as sreward
    from tristage.train.losses import bradley_terry_loss

    rt = world.rtrainer
    rds = rt.train_dataset
    rbatch = rt.data_collator([rds[i] for i in range(BATCH)])
    packed = collate_pairs_shared(world.ex[:BATCH], world.tok.pad_id, pack=True)
    with torch.no_grad():
        rew = rt.model(input_ids=rbatch["input_ids"], attention_mask=rbatch["attention_mask"]).logits.squeeze(-1)
        ours_rm = load_reward_model(world.work / "rm", dtype=torch.float32)
        s = sreward.pair_scores(ours_rm, world.ob, "cpu")[:, 0]
        s_packed = sreward.pair_scores(ours_rm, packed, "cpu")[:, 0]
    assert_close(s, rew)
    assert_close(s_packed, rew)
    margin = torch.rand(BATCH, generator=torch.Generator().manual_seed(2))
    try:
        for coef, mg in ((None, None), (0.01, None), (None, margin), (0.01, margin)):
            rt.args.center_rewards_coefficient = coef
            inputs = dict(rbatch)
            if mg is not None:
                inputs["margin"] = mg
            with torch.no_grad():
                trl_loss = rt.compute_loss(rt.model, inputs)
            rc, rr = rew.chunk(2)
            assert_close(bradley_terry_loss(rc, rr, mg, coef or 0.0), trl_loss)
            assert_close(bradley_terry_loss(s[:BATCH], s[BATCH:], mg, coef or 0.0), trl_loss)
    finally:
        rt.args.center_rewards_coefficient = None


def test_parity_checks_can_fail():
    """The comparison itself: a difference above the tolerance fails."""
    assert_close(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 5e-6]))
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 5e-5]))
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([float("nan")]), torch.tensor([0.0]))
    with pytest.raises(AssertionError):
        assert_close(torch.tensor([100.0]), torch.tensor([100.001]), rel=1e-6)

