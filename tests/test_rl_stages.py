"""The RL stages end to end on tiny models: PPO and GRPO / RLOO move every trained parameter, keep their metrics
finite, write folders transformers loads, start at ratio 1, resume exactly, split over two processes exactly, and
refuse bad input with one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SOUNDS, tiny_config, write_jsonl

from tristage import cli
from tristage.config import parse
from tristage.stages import grpo, ppo, rl

REWARD_PY = '''
def woof(prompt, answers):
    """1/8 per 'o' in the answer, capped, plus a little per distinct character: a reward the tiny policy can climb
    that is never the same for every answer to a prompt (so every GRPO step has a signal)."""
    return [min(a.count("o"), 8) / 8 + len(set(a)) / 100 for a in answers]
'''


@pytest.fixture(scope="module")
def world(tiny_shards, tmp_path_factory) -> Path:
    from tristage.model.gpt import build_model
    from tristage.model.hf import save_model
    from tristage.model.score import from_causal_lm, save_reward_model
    from tristage.tokenizer import Tokenizer, train_char

    root = tmp_path_factory.mktemp("rl")
    tok = Tokenizer.load(tiny_shards / "tokenizer")
    save_model(build_model(tiny_config(tok), seed=0), root / "policy", tok)
    save_reward_model(from_causal_lm(build_model(tiny_config(tok), seed=1), 1, seed=2), root / "rm", tok)
    write_jsonl(root / "prompts.jsonl", [{"prompt": f"what does the {a} say?"} for a in list(SOUNDS) * 4])
    write_jsonl(root / "val.jsonl", [{"prompt": f"and the {a}?"} for a in SOUNDS])
    (root / "rewards.py").write_text(REWARD_PY)
    (root / "other.txt").write_text("a different alphabet: xyz 0123456789 QWERTY")
    other = train_char([str(root / "other.txt")])
    save_reward_model(from_causal_lm(build_model(tiny_config(other), seed=1), 1, seed=2), root / "rm_other", other)
    return root


def _common(world: Path, out: Path, *extra: str) -> list[str]:
    return [str(world / "policy"), "--prompts", str(world / "prompts.jsonl"), "--val-prompts", str(world / "val.jsonl"),
            "--out", str(out), "--max-new-tokens", "12", "--eval-every", "2", "--eval-prompts", "3", "--lr", "1e-3",
            "--dtype", "float32", "--device", "cpu", "--no-progress", "--log-every", "1", *extra]


def _ppo(world: Path, out: Path, *extra: str) -> list[str]:
    return _common(world, out, "--reward", str(world / "rm"), "--batch-size", "4", "--max-steps", "3", *extra)


def _grpo(world: Path, out: Path, *extra: str) -> list[str]:
    return _common(world, out, "--reward", f"python:{world / 'rewards.py'}:woof", "--batch-size", "2",
                   "--num-samples", "3", "--max-steps", "3", *extra)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _all_finite(rows: list[dict]) -> bool:
    return all(math.isfinite(v) for r in rows for k, v in r.items() if isinstance(v, float))


def test_ppo_moves_every_parameter_and_writes_loadable_folders(world, tmp_path):
    import transformers

    out = tmp_path / "ppo"
    m = ppo.main(parse(ppo.Config, _ppo(world, out, "--gold", f"python:{world / 'rewards.py'}:woof")))
    before, after = _weights(world / "policy"), _weights(out / "model")
    assert before.keys() == after.keys()
    assert [k for k in before if torch.equal(before[k], after[k])] == []
    rm, value = _weights(world / "rm"), _weights(out / "value")
    assert [k for k in rm if torch.equal(rm[k], value[k])] == []  # the value model trained from the reward model
    rows = _metrics(out)
    assert _all_finite(rows) and [r["step"] for r in rows if "reward" in r] == [1, 2, 3]
    for key in ("reward", "gold", "kl", "entropy", "length", "stop_rate", "clipfrac", "vf_loss", "explained_variance",
                "ratio", "ratio_max", "beta"):
        assert key in m, key
    assert {"eval_reward", "eval_gold", "eval_kl"} <= {k for r in rows for k in r}
    assert (out / "curves.png").stat().st_size > 0 and (out / "best" / "model.safetensors").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(out / "model")
    ids = torch.tensor([[1, 2, 3]])
    from tristage.model.hf import load_model

    ours = load_model(out / "model").eval()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-5)


def test_ppo_with_a_function_as_the_reward_starts_the_value_model_from_the_policy(world, tmp_path):
    """--reward python:... (or gold): no reward model; the value model is a new head on the policy, and the
    scores the advantages start from are the function's."""
    out = tmp_path / "ppo_fn"
    fn = f"python:{world / 'rewards.py'}:woof"
    m = ppo.main(parse(ppo.Config, _ppo(world, out, "--reward", fn, "--gold", fn)))
    before, after = _weights(world / "policy"), _weights(out / "model")
    assert [k for k in before if torch.equal(before[k], after[k])] == []
    value = _weights(out / "value")
    shared = [k for k in value if k != "score.weight" and k in before]
    assert shared and "score.weight" in value and value["score.weight"].shape[0] == 1
    rows = [r for r in _metrics(out) if "reward" in r]
    assert _all_finite(rows) and len(rows) == 3
    assert all(r["reward"] == pytest.approx(r["gold"]) for r in rows)  # the same function: the same scores
    assert "explained_variance" in m


@pytest.mark.parametrize("variant", [("grpo", "token"), ("rloo", "token"), ("grpo-unscaled", "sequence")])
def test_grpo_moves_every_parameter(world, tmp_path, variant):
    baseline, agg = variant
    out = tmp_path / baseline
    m = grpo.main(parse(grpo.Config, _grpo(world, out, "--baseline", baseline, "--loss-agg", agg, "--beta", "0.1")))
    before, after = _weights(world / "policy"), _weights(out / "model")
    assert [k for k in before if torch.equal(before[k], after[k])] == []
    assert _all_finite(_metrics(out))
    assert m["reward"] >= 0 and abs(m["ratio_first"] - 1) < 1e-5
    assert ("kl_loss" in m) == (baseline != "rloo")  # the KL in the loss (grpo) or in the reward (rloo), not both


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_first_ratio_is_one(world, temperature):
    """Log-probs recomputed in the update equal the rollout's (same temperature, no dropout), whatever the
    micro-batch split: the first minibatch's ratio is 1 to within 1e-5."""
    from tristage.data.records import read_prompt_file
    from tristage.model.hf import load_model
    from tristage.tokenizer import Tokenizer
    from tristage.train import loop

    cfg = parse(grpo.Config, _grpo(world, Path("/nonexistent"), "--temperature", str(temperature)))
    s = loop.Session(cfg, "grpo", __import__("tristage.train.distributed", fromlist=["x"]).init("cpu"),
                     torch.float32, Path("/nonexistent"), Path("/nonexistent"), None)
    tok = Tokenizer.load(world / "policy")
    policy = load_model(world / "policy")
    rows = read_prompt_file(world / "prompts.jsonl")[:4]
    b = rl.collect(policy, None, tok, list(tok.stop_ids), rows, 3, 0, 0, cfg, s)
    assert len(b.texts) == 12 and b.ref_logp is None
    for size in (1, 5, 12):
        for mb in b.micro_batches(list(range(12))[::-1], size):
            logp, _ = rl.policy_logprobs(policy, mb, temperature)
            assert (logp - mb["old_logp"]).exp().sub(1).abs().max().item() < 1e-5


def test_answers_do_not_depend_on_how_the_batch_is_split(world):
    """One seed per answer: the same answers whether prompts are sampled together or one by one."""
    from tristage.data.records import read_prompt_file
    from tristage.model.hf import load_model
    from tristage.tokenizer import Tokenizer
    from tristage.train import distributed as dist
    from tristage.train import loop

    cfg = parse(grpo.Config, _grpo(world, Path("/x")))
    s = loop.Session(cfg, "grpo", dist.init("cpu"), torch.float32, Path("/x"), Path("/x"), None)
    tok, policy = Tokenizer.load(world / "policy"), load_model(world / "policy")
    rows = read_prompt_file(world / "prompts.jsonl")[:4]
    together = rl.collect(policy, None, tok, list(tok.stop_ids), rows, 3, 5, 0, cfg, s).answer_ids
    apart = [a for i, r in enumerate(rows) for a in rl.collect(policy, None, tok, list(tok.stop_ids), [r], 3, 5, 3 * i,
                                                                  cfg, s).answer_ids]
    assert together == apart and len({tuple(a) for a in together}) > 1


def test_one_update_per_batch_takes_the_rollout_logprobs_from_it(world, tmp_path):
    """GRPO with one optimizer step per batch skips the separate no-grad policy pass: the KL and entropy it logs,
    taken from the step's own forward, equal those of that pass over the same answers (seeded per answer)."""
    from tristage.model.gpt import build_model
    from tristage.model.hf import load_model, save_model
    from tristage.tokenizer import Tokenizer
    from tristage.train import distributed as dist
    from tristage.train import loop
    from tristage.train.rl import kl_estimate

    tok = Tokenizer.load(world / "policy")
    save_model(build_model(tiny_config(tok), seed=5), tmp_path / "ref", tok)  # a reference unlike the policy
    cfg = parse(grpo.Config, _grpo(world, tmp_path / "run", "--max-steps", "1", "--beta", "0.04", "--eval-every", "0",
                                   "--ref-model", str(tmp_path / "ref")))
    logged = grpo.main(cfg)
    s = loop.Session(cfg, "grpo", dist.init("cpu"), torch.float32, Path("/x"), Path("/x"), None)
    policy, ref = load_model(world / "policy"), load_model(tmp_path / "ref")
    train, _, _ = rl.load_prompt_splits(cfg, tok, rl.fit_answer_length(cfg) - cfg.max_new_tokens)
    rows = next(rl.PromptLoader(train, cfg.batch_size, cfg.seed))
    b = rl.collect(policy, ref, tok, list(tok.stop_ids), rows, cfg.num_samples, 0, 0, cfg, s)
    want = rl.batch_stats(b, s.d, kl_estimate(b.old_logp, b.ref_logp, "k1"), [0.0] * len(b.texts), None)
    assert logged["kl"] == pytest.approx(want["kl"], rel=1e-5) and abs(want["kl"]) > 1e-3
    assert logged["entropy"] == pytest.approx(want["entropy"], rel=1e-5) and want["entropy"] > 0
    assert logged["ratio_first"] == 1.0 and logged["length"] == want["length"]


def test_reward_model_reads_the_sampled_tokens(world):
    """A reward model with the policy's tokenizer scores each answer's own tokens (prompt + answer without its stop
    token + the end of turn), which is what the text path gives for the text those tokens spell (special tokens
    kept); a reward model with another tokenizer reads the decoded texts."""
    from tristage.data.records import read_prompt_file
    from tristage.model.hf import load_model
    from tristage.rollout import encode_for_reward, pad_id, score_ids
    from tristage.tokenizer import Tokenizer
    from tristage.train import distributed as dist
    from tristage.train import loop

    cfg = parse(grpo.Config, _grpo(world, Path("/x"), "--max-new-tokens", "24"))
    s = loop.Session(cfg, "grpo", dist.init("cpu"), torch.float32, Path("/x"), Path("/x"), None)
    tok, policy = Tokenizer.load(world / "policy"), load_model(world / "policy")
    rows = read_prompt_file(world / "prompts.jsonl")[:4]
    b = rl.collect(policy, None, tok, list(tok.stop_ids), rows, 3, 0, 0, cfg, s)
    assert 0 < sum(b.stopped) < len(b.stopped)  # both ways an answer ends are covered
    rm = rl.make_scorer(str(world / "rm"), s, 1 << 30, "--reward")
    got = rl.score(rm, b, 3, s, tok)
    bodies = [a[:-1] if stop else a for a, stop in zip(b.answer_ids, b.stopped)]
    end = encode_for_reward(tok, b.messages[0], "", 1 << 30)[len(b.prompt_ids[0]):]  # the template's end of turn
    assert len(end) >= 1
    ids = [list(p) + body + end for p, body in zip(b.prompt_ids, bodies)]
    assert got == pytest.approx(rm.rm.combine(score_ids(rm.rm, ids, pad_id(tok))).tolist(), abs=1e-5)
    texts = ["the cow says moo.", "moo moo", ""]  # answers whose tokens are those of their text: the text path agrees
    stop = tok.stop_ids[0]
    answers = [tok.encode(texts[0]) + [stop], tok.encode(texts[1]), [stop]]
    same = rm.scores_sampled([b.messages[0]], [b.prompt_ids[0]], [answers], [[True, False, True]], tok)
    assert same[0] == pytest.approx(rm.scores([b.messages[0]], [texts])[0], abs=1e-6)
    assert rm.scores_sampled([b.messages[0]], [b.prompt_ids[0]], [b.answer_ids[:3]], [b.stopped[:3]], None) is None
    other = rl.make_scorer(str(world / "rm_other"), s, 1 << 30, "--reward")
    assert other.scores_sampled([b.messages[0]], [b.prompt_ids[0]], [b.answer_ids[:3]], [b.stopped[:3]], tok) is None
    texts = [x for i in range(0, 12, 3) for x in other.scores([b.messages[i]], [b.texts[i:i + 3]])[0]]
    assert rl.score(other, b, 3, s, tok) == pytest.approx(texts, abs=1e-5)


@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_resume_is_exact(world, tmp_path, stage):
    mod, args = (ppo, _ppo) if stage == "ppo" else (grpo, _grpo)
    mod.main(parse(mod.Config, args(world, tmp_path / "straight", "--max-steps", "4")))
    mod.main(parse(mod.Config, args(world, tmp_path / "split", "--max-steps", "4", "--stop-at", "2")))
    mod.main(parse(mod.Config, args(world, tmp_path / "split", "--max-steps", "4", "--resume")))
    a, b = _weights(tmp_path / "straight" / "model"), _weights(tmp_path / "split" / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    assert [r.get("loss") for r in ra] == [r.get("loss") for r in rb]
    assert [r.get("tokens") for r in ra] == [r.get("tokens") for r in rb]
    assert all(r["tokens"] > 0 and 0 < r["mfu"] < 1 for r in ra if "loss" in r)


@pytest.mark.distributed
@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_two_processes_equal_one(world, tmp_path, stage):
    mod, args = (ppo, _ppo) if stage == "ppo" else (grpo, _grpo)
    batch = {"ppo": 4, "grpo": 2}[stage]
    mod.main(parse(mod.Config, args(world, tmp_path / "one", "--batch-size", str(batch), "--eval-every", "0")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m", "tristage.cli",
           stage, *args(world, tmp_path / "two", "--batch-size", str(batch // 2), "--eval-every", "0")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = ([r for r in _metrics(tmp_path / run) if "reward" in r] for run in ("one", "two"))
    assert len(a) == 3
    for x, y in zip(a, b, strict=True):
        for key in ("reward", "kl", "length", "loss", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-5), (stage, x["step"], key)


# ----------------------------------------------------------------------------- the monitor's and watch's words
class _Rep:
    def __init__(self):
        self.lines: list[str] = []

    def print(self, text: str) -> None:
        self.lines.append(text)


def test_watch_warns_in_plain_words():
    rep = _Rep()
    w = rl.Watch(rep)  # type: ignore[arg-type]
    base = {"kl": 0.1, "kl_stderr": 0.01, "length": 40.0, "distinct": 1.0, "ratio": 1.0, "ratio_max": 1.2}
    w.check(1, base)
    assert rep.lines == []
    w.check(2, {**base, "kl": -0.5})
    w.check(3, {**base, "ratio_max": 30.0})
    w.check(4, {**base, "length": 5.0})
    w.check(5, {**base, "distinct": 0.2})
    w.check(6, {**base, "kl": -0.5})  # once per kind
    assert len(rep.lines) == 4
    for word, line in zip(("negative", "ratio", "length", "diversity"), rep.lines):
        assert word in line


def test_over_optimisation_is_named():
    mon = rl.Monitor.__new__(rl.Monitor)
    mon.best_at = {"step": 10, "eval_reward": 0.5, "eval_gold": 0.9}
    assert mon.over_optimised({"eval_reward": 0.8, "eval_gold": 0.7, "eval_gold_stderr": 0.02}) is not None
    assert mon.over_optimised({"eval_reward": 0.8, "eval_gold": 0.895, "eval_gold_stderr": 0.02}) is None  # noise
    assert mon.over_optimised({"eval_reward": 0.4, "eval_gold": 0.7, "eval_gold_stderr": 0.02}) is None  # both fell


# ----------------------------------------------------------------------------- bad input: one line, exit 2
def _cli(capsys, argv: list[str]) -> tuple[int, str]:
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("case", ["reward_is_policy", "policy_is_reward", "fsdp", "temperature", "no_prompts",
                                  "empty_prompts", "python_reward", "minibatches", "max_new", "grad_accum",
                                  "value_model", "value_vocab"])
def test_bad_input_is_one_line(world, tmp_path, capsys, case):
    (tmp_path / "empty.jsonl").write_text("")
    stage, argv, named = {
        "reward_is_policy": ("ppo", _ppo(world, tmp_path / "o", "--reward", str(world / "policy")), "not a reward"),
        "policy_is_reward": ("ppo", [str(world / "rm"), *_ppo(world, tmp_path / "o")[1:]], "reward model"),
        "fsdp": ("grpo", _grpo(world, tmp_path / "o", "--parallel", "fsdp"), "--parallel"),
        "temperature": ("grpo", _grpo(world, tmp_path / "o", "--temperature", "0"), "--temperature"),
        "no_prompts": ("ppo", [str(world / "policy"), "--reward", str(world / "rm"), "--out", str(tmp_path / "o")],
                       "--prompts"),
        "empty_prompts": ("grpo", _grpo(world, tmp_path / "o", "--prompts", str(tmp_path / "empty.jsonl")),
                          "empty.jsonl"),
        "python_reward": ("grpo", _grpo(world, tmp_path / "o", "--reward", "python:nosuchmodule:f"), "nosuchmodule"),
        "minibatches": ("grpo", _grpo(world, tmp_path / "o", "--num-minibatches", "50"), "--num-minibatches"),
        "max_new": ("ppo", _ppo(world, tmp_path / "o", "--max-new-tokens", "500"), "--max-new-tokens"),
        "grad_accum": ("ppo", _ppo(world, tmp_path / "o", "--grad-accum", "2"), "--micro-batch-size"),
        "value_model": ("ppo", _ppo(world, tmp_path / "o", "--value-model", str(world / "policy")), "not a reward"),
        "value_vocab": ("ppo", _ppo(world, tmp_path / "o", "--reward", str(world / "rm_other")), "another tokenizer"),
    }[case]
    code, err = _cli(capsys, [stage, *argv])
    assert code == 2 and "Traceback" not in err and named in err, err
    assert len(err.strip().splitlines()) == 1, err
