"""AI feedback: preference pairs from a policy's own samples, labelled without a human in the loop.

    tristage label runs/sft/model --prompts world/eval/prompts.jsonl --judge world --out runs/label/pairs.jsonl
    tristage label runs/sft/model --prompts prompts.jsonl --judge rm:runs/rm/model --num-samples 8 --out pairs.jsonl
    tristage label runs/sft/model --prompts prompts.jsonl --judge python:mypkg.judges:brevity --out pairs.jsonl
    tristage label runs/sft/model --prompts prompts.jsonl --judge llm:path/to/Qwen2.5-0.5B-Instruct --out pairs.jsonl

The algorithm: each prompt is rendered with the policy's chat template (+ generation prompt), repeated
--num-samples (k) times in one engine batch and sampled (the rows draw different random numbers, so they
differ; one seeded generator makes the run reproducible), then a judge turns the k answers into one pair.
The output is the preference format tristage/data/preference.py reads (for `tristage reward` / `tristage dpo`):
{"prompt", "chosen", "rejected", "judge": SPEC, "scores": {"chosen": x, "rejected": y}, ...}, the other keys
kept there as meta.

Judges (--judge):
  rm:PATH                 a reward model folder: the combined scalar of tristage.serve.score.score_texts (the
                          reward stage's rendering, with the RM folder's own tokenizer).
  gold                    the demo world's gold scorer, tristage.world.score(prompt, response).overall (noiseless).
  python:MODULE:FUNCTION  any importable f(prompt: str, responses: list[str]) -> list[float] (MODULE may also
                          be a path to a .py file); prompt is the last user message's text.
  llm:PATH                a chat model folder as judge. For every ordered pair of distinct samples (i as A, j as
                          B) it reads one plain forward pass over the fixed judge prompt (JUDGE_PROMPT, one user
                          message + the generation prompt): P(A) = softmax over the logits of the tokens "A"
                          and "B" at the answer position (the first token of each). Both orders are asked and
                          averaged, P(i beats j) = (P_A(i, j) + 1 - P_A(j, i)) / 2, which cancels a position bias.
                          A sample's score is its mean P(beats) against the others (a round robin, k(k-1)
                          forwards per prompt); "p_chosen" records P(chosen beats rejected).
  world                   the demo world's simulated annotator (a noisy Bradley-Terry human stand-in): it labels
                          pairs, not single answers, so as with a real annotator one pair of distinct samples is
                          drawn per prompt (seeded by --seed and the prompt's index) and `Annotator.compare`
                          chooses; its ratings and rationale are recorded as in the world's own preference data,
                          "scores" are the gold scores its draw was based on, "p_chosen" the probability it had
                          of choosing as it did.

Choices, and why:
- Scalar judges (all but world) pair the highest-scored sample against the lowest-scored one: the widest gap,
  the clearest signal. Ties go to the first sample drawn. Samples are deduplicated and blank ones dropped first
  (the preference reader refuses blank or identical replies); a prompt with fewer than two distinct answers
  ("identical"), or whose distinct answers all score the same ("tied"), is skipped and counted.
- Answers are the decoded samples without the stop token and stripped of surrounding whitespace.
- The summary (printed, and returned by main) gives pairs written, skipped, the judge's mean score of chosen vs
  rejected, and, for world prompts (--gold-report auto: when most prompts parse as a world request, or the
  judge is world/gold), the mean gold score of chosen vs rejected and the share of pairs with a gold gap that
  the judge ordered as gold does (agreement).
- Everything is written at the end, atomically (tristage.io): a crash leaves no half file.
Simplified: one judge per run; no judge ensembles; the policy and the judge are both held in memory.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tristage.config import arg
from tristage.data.records import prompt_field, prompt_messages
from tristage.io import DataError, read_jsonl, write_jsonl

JUDGE_PROMPT = ("Which response is better? Answer A or B.\n\n"
                "[Request]\n{request}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
                "Which response is better? Answer A or B.")


@dataclass
class Config:
    """Sample k answers per prompt from a policy and let a judge pick a preference pair (AI feedback)."""

    model: str = arg(help="policy model folder (a chat model: its tokenizer needs a chat_template)", positional=True)
    prompts: str = arg(help="JSONL of {prompt: text | messages} (or {messages}, cut after the last user turn); "
                            "the demo world's eval/prompts.jsonl and preference files work as they are")
    out: str = arg(help="JSONL of preference pairs to write (atomically)")
    judge: str = arg(help="rm:PATH | gold | world | python:MODULE:FUNCTION | llm:PATH (see the description above)")
    num_samples: int = arg(4, help="answers sampled per prompt (k >= 2)")
    temperature: float = arg(1.0, help="sampling temperature (0 = greedy: all k samples would be the same)")
    top_p: float = arg(1.0, help="nucleus sampling mass (1 = off)")
    top_k: int = arg(0, help="keep only the k most likely tokens (0 = off)")
    max_new_tokens: int = arg(160, help="tokens per answer at most")
    seed: int = arg(0, help="seed of the sampler and of the world judge's draws: same seed, same file")
    limit: int | None = arg(None, help="use only the first N prompts")
    batch_size: int = arg(16, help="prompts per generation batch (each repeated k times: batch_size * k rows)")
    judge_batch_size: int = arg(16, help="sequences per forward pass of an rm: or llm: judge")
    max_len: int = arg(1024, help="longest rm:/llm: judge input in tokens (capped at the judge's max positions); "
                                  "longer inputs lose tokens from the left (counted)")
    annotator_temperature: float = arg(0.1, help="noise of the world judge's simulated annotator (0 = perfect)")
    gold_report: Literal["auto", "on", "off"] = arg("auto", help="report gold scores of chosen vs rejected: auto = "
                                                                 "for world prompts / world and gold judges")
    save_samples: bool = arg(False, help="also record all k samples (and their judge scores) in each pair")
    device: str = arg("cpu", help="cpu, cuda, cuda:1, mps")
    dtype: str = arg("float32", help="float32, bfloat16, float16, or auto (policy and judge models)")
    progress: bool = arg(True, help="show a progress bar")


# ----------------------------------------------------------------------------- prompts
@dataclass
class PromptRow:
    prompt: str | list[dict[str, str]]  # as written to the output records
    messages: list[dict[str, str]]  # ends with the user's turn
    line: int

    @property
    def text(self) -> str:
        """The last user message: what the world scorer, the annotator and python judges see."""
        return self.messages[-1]["content"]


def read_prompt_file(path: str | Path) -> list[PromptRow]:
    """{prompt: text | messages} or {messages} records (a messages list is cut after its last user turn);
    a bad record raises DataError with file, line and field (the prompt is checked by the one prompt parser,
    tristage.data.records.prompt_messages)."""
    rows = []
    for line, obj in read_jsonl(path):
        try:
            key = prompt_field(obj)
            value = obj[key]
            if isinstance(value, list):
                users = [i for i, m in enumerate(value) if isinstance(m, dict) and m.get("role") == "user"]
                value = value[:users[-1] + 1] if users else value
            messages = prompt_messages(value, key)
        except DataError as e:
            raise e.at(path, line) from None
        rows.append(PromptRow(value, messages, line))
    return rows


# ----------------------------------------------------------------------------- judges
def load_function(spec: str) -> Callable[[str, list[str]], list[float]]:
    """`module:function` or `path/to/file.py:function` -> the function."""
    mod, _, name = spec.rpartition(":")
    if not mod or not name:
        raise ValueError(f"python judge {spec!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    if mod.endswith(".py"):
        s = importlib.util.spec_from_file_location(Path(mod).stem, mod)
        if s is None or s.loader is None:
            raise ValueError(f"python judge: cannot load {mod}")
        module = importlib.util.module_from_spec(s)
        s.loader.exec_module(module)
    else:
        module = importlib.import_module(mod)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"python judge: {mod} has no function {name!r}")
    return fn


class ScalarJudge:
    """Scores each answer on its own: scores(prompts, candidates) -> one list of floats per prompt."""

    spec: str = ""
    stats: dict[str, int]

    def scores(self, prompts: Sequence[PromptRow], candidates: Sequence[list[str]]) -> list[list[float]]:
        raise NotImplementedError

    def extra(self, k: int, hi: int, lo: int) -> dict[str, Any]:
        """More fields for prompt k's record (chosen = candidate hi, rejected = candidate lo)."""
        return {}


class GoldJudge(ScalarJudge):
    def __init__(self, spec: str):
        self.spec, self.stats = spec, {}

    def scores(self, prompts, candidates):
        from tristage.world import score

        return [[score(p.text, c).overall for c in cs] for p, cs in zip(prompts, candidates)]


class PythonJudge(ScalarJudge):
    def __init__(self, spec: str, target: str):
        self.spec, self.stats, self.target = spec, {}, target
        self.fn = load_function(target)

    def scores(self, prompts, candidates):
        out = []
        for p, cs in zip(prompts, candidates):
            s = self.fn(p.text, list(cs))
            try:
                s = [float(x) for x in s]
            except (TypeError, ValueError):
                raise ValueError(f"python judge {self.target}: expected a list of numbers, got {s!r:.100}") from None
            if len(s) != len(cs) or not all(math.isfinite(x) for x in s):
                raise ValueError(f"python judge {self.target}: expected {len(cs)} finite scores, got {s!r:.100}")
            out.append(s)
        return out


class RewardJudge(ScalarJudge):
    def __init__(self, spec: str, folder: str, cfg: Config, device: torch.device, dtype: torch.dtype):
        from tristage.model.reward import load_reward_model
        from tristage.tokenizer import Tokenizer

        self.spec, self.stats = spec, {"truncated": 0}
        self.tok = Tokenizer.load(folder)
        if not self.tok.chat_template:
            raise ValueError(f"{folder}: the reward model's tokenizer has no chat_template")
        self.rm = load_reward_model(folder, device=device, dtype=dtype).eval()
        self.batch_size, self.max_len = cfg.judge_batch_size, cfg.max_len

    def scores(self, prompts, candidates):
        from tristage.serve.score import score_texts

        flat_p = [p.messages for p, cs in zip(prompts, candidates) for _ in cs]
        flat_r = [c for cs in candidates for c in cs]
        s = self.rm.combine(score_texts(self.rm, self.tok, flat_p, flat_r, self.batch_size, self.max_len,
                                        stats=self.stats)).tolist()
        out, i = [], 0
        for cs in candidates:
            out.append(s[i:i + len(cs)])
            i += len(cs)
        return out


def _conversation(messages: list[dict[str, str]]) -> str:
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


class LLMJudge(ScalarJudge):
    """Round-robin pairwise judge; see the module docstring."""

    def __init__(self, spec: str, folder: str, cfg: Config, device: torch.device, dtype: torch.dtype):
        from tristage.model.hf import load_model
        from tristage.tokenizer import Tokenizer

        self.spec, self.stats = spec, {"truncated": 0}
        self.tok = Tokenizer.load(folder)
        if not self.tok.chat_template:
            raise ValueError(f"{folder}: the judge's tokenizer has no chat_template")
        self.model = load_model(folder, device=device, dtype=dtype).eval()
        self.batch_size = cfg.judge_batch_size
        self.max_len = min(cfg.max_len, self.model.config.max_position_embeddings)
        a, b = self.tok.encode("A"), self.tok.encode("B")
        if not a or not b or a[0] == b[0]:
            raise ValueError(f"{folder}: the tokens 'A' and 'B' do not encode to distinct first tokens")
        self.ab = torch.tensor([a[0], b[0]])
        self.pairwise: list[torch.Tensor] = []  # per prompt of the last call: P(i beats j) [m, m]

    def prompt_ids(self, messages: list[dict[str, str]], a: str, b: str) -> list[int]:
        text = JUDGE_PROMPT.format(request=_conversation(messages), a=a, b=b)
        ids = list(self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))
        if len(ids) > self.max_len:
            self.stats["truncated"] += 1
            ids = ids[len(ids) - self.max_len:]
        return ids

    @torch.no_grad()
    def p_first(self, seqs: list[list[int]]) -> list[float]:
        """P("A") against "B" at the position after each sequence."""
        dev = next(self.model.parameters()).device
        pad = self.tok.pad_id if self.tok.pad_id is not None else 0
        out = [0.0] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            T = max(len(seqs[i]) for i in idx)
            x = torch.full((len(idx), T), pad, dtype=torch.long)
            for r, i in enumerate(idx):
                x[r, :len(seqs[i])] = torch.tensor(seqs[i])
            last = torch.tensor([len(seqs[i]) - 1 for i in idx], device=dev)
            h = self.model.hidden_states(x.to(dev))  # right padding + causal attention: exact for the real tokens
            logits = self.model.logits(h[torch.arange(len(idx), device=dev), last]).float()
            p = logits[:, self.ab.to(dev)].softmax(-1)[:, 0].cpu().tolist()
            for r, i in enumerate(idx):
                out[i] = p[r]
        return out

    def scores(self, prompts, candidates):
        seqs, where = [], []
        for k, (p, cs) in enumerate(zip(prompts, candidates)):
            for i in range(len(cs)):
                for j in range(len(cs)):
                    if i != j:
                        seqs.append(self.prompt_ids(p.messages, cs[i], cs[j]))
                        where.append((k, i, j))
        p_a = self.p_first(seqs)
        first = [torch.full((len(cs), len(cs)), math.nan) for cs in candidates]
        for (k, i, j), p in zip(where, p_a):
            first[k][i, j] = p
        self.pairwise, out = [], []
        for f in first:
            beats = (f + (1 - f.T)) / 2  # P(i beats j), both orders averaged
            beats.fill_diagonal_(0.0)
            self.pairwise.append(beats)
            m = f.shape[0]
            out.append((beats.sum(1) / max(m - 1, 1)).tolist())
        return out

    def extra(self, k, hi, lo):
        return {"p_chosen": float(self.pairwise[k][hi, lo])}


def make_judge(spec: str, cfg: Config, device: torch.device, dtype: torch.dtype) -> ScalarJudge | None:
    """The judge for --judge SPEC; None for `world` (the annotator, handled pairwise)."""
    kind, _, rest = spec.partition(":")
    if kind == "world" and not rest:
        return None
    if kind == "gold" and not rest:
        return GoldJudge(spec)
    if kind == "python" and rest:
        return PythonJudge(spec, rest)
    if kind == "rm" and rest:
        return RewardJudge(spec, rest, cfg, device, dtype)
    if kind == "llm" and rest:
        return LLMJudge(spec, rest, cfg, device, dtype)
    raise ValueError(f"--judge {spec!r}: expected rm:PATH, gold, world, python:MODULE:FUNCTION or llm:PATH")


# ----------------------------------------------------------------------------- sampling
def sample_answers(engine: Any, tokenizer: Any, messages: Sequence[list[dict[str, str]]], k: int, params: Any,
                   generator: torch.Generator | None = None) -> list[list[str]]:
    """k sampled answers (decoded, stop token removed, stripped) per prompt, all in one engine batch."""
    from tristage.serve.generate import response_text

    ids = [list(tokenizer.apply_chat_template(m, add_generation_prompt=True)) for m in messages]
    outs = engine.generate([x for x in ids for _ in range(k)], params, generator=generator)
    texts = [response_text(tokenizer, o.tokens, o.finish_reason).strip() for o in outs]
    return [texts[i * k:(i + 1) * k] for i in range(len(messages))]


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def main(cfg: Config) -> dict[str, Any]:
    from tristage.model.hf import load_model
    from tristage.serve.engine import Engine, SamplingParams
    from tristage.serve.generate import stop_ids
    from tristage.tokenizer import Tokenizer
    from tristage.train.common import progress, resolve_dtype

    if cfg.num_samples < 2:
        raise SystemExit("--num-samples must be >= 2 (a pair needs two answers)")
    if cfg.batch_size < 1 or cfg.judge_batch_size < 1 or cfg.max_new_tokens < 1:
        raise SystemExit("--batch-size, --judge-batch-size and --max-new-tokens must be >= 1")
    rows = read_prompt_file(cfg.prompts)[:cfg.limit]
    if not rows:
        raise SystemExit(f"{cfg.prompts}: no prompts")
    device = torch.device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    folder = Path(cfg.model)
    tok = Tokenizer.load(folder)
    if not tok.chat_template:
        raise SystemExit(f"{folder}: the tokenizer has no chat_template (label samples a chat model)")
    try:
        judge = make_judge(cfg.judge, cfg, device, dtype)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    annotator = None
    if judge is None:
        from tristage.world import Annotator

        annotator = Annotator(cfg.annotator_temperature, cfg.seed)
    gold_on = cfg.gold_report == "on"
    if cfg.gold_report == "auto":
        from tristage.world.prompts import parse_prompt

        world_like = sum(parse_prompt(r.text).kind != "free" for r in rows)
        gold_on = judge is None or isinstance(judge, GoldJudge) or world_like * 2 >= len(rows)

    model = load_model(folder, device=device, dtype=dtype).eval()
    engine = Engine(model)
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                            top_p=cfg.top_p, stop_ids=stop_ids(tok, folder))
    generator = torch.Generator(device).manual_seed(cfg.seed)
    k = cfg.num_samples

    records: list[dict[str, Any]] = []
    texts: list[str] = []  # the user text of each record's prompt (for the gold report)
    skipped = {"identical": 0, "tied": 0}
    distinct_counts: list[int] = []
    with progress(cfg.progress) as bar:
        task = bar.add_task("label", total=len(rows), info="")
        for start in range(0, len(rows), cfg.batch_size):
            chunk = rows[start:start + cfg.batch_size]
            samples = sample_answers(engine, tok, [r.messages for r in chunk], k, params, generator)
            cands = [list(dict.fromkeys(s for s in ss if s)) for ss in samples]  # distinct, non-blank
            distinct_counts += [len(set(ss)) for ss in samples]
            live = [i for i, c in enumerate(cands) if len(c) >= 2]
            skipped["identical"] += len(chunk) - len(live)
            if annotator is not None:
                for i in live:
                    r = chunk[i]
                    a, b = random.Random(f"{cfg.seed}/{start + i}").sample(cands[i], 2)
                    j = annotator.compare(r.text, a, b)
                    rec = {"prompt": r.prompt, "chosen": j.chosen, "rejected": j.rejected, "judge": cfg.judge,
                           "scores": {"chosen": j.gold_chosen, "rejected": j.gold_rejected},
                           "ratings": j.ratings, "rationale": j.rationale,
                           "p_chosen": j.p_a if j.a_preferred else 1.0 - j.p_a}
                    if cfg.save_samples:
                        rec["samples"] = samples[i]
                    records.append(rec)
                    texts.append(r.text)
            elif live:
                scores = judge.scores([chunk[i] for i in live], [cands[i] for i in live])
                for n, (i, s) in enumerate(zip(live, scores)):
                    hi = max(range(len(s)), key=s.__getitem__)
                    lo = min(range(len(s)), key=s.__getitem__)
                    if s[hi] == s[lo]:
                        skipped["tied"] += 1
                        continue
                    rec = {"prompt": chunk[i].prompt, "chosen": cands[i][hi], "rejected": cands[i][lo],
                           "judge": cfg.judge, "scores": {"chosen": s[hi], "rejected": s[lo]},
                           **judge.extra(n, hi, lo)}
                    if cfg.save_samples:
                        rec["samples"] = samples[i]
                        rec["sample_scores"] = {c: x for c, x in zip(cands[i], s)}
                    records.append(rec)
                    texts.append(chunk[i].text)
            bar.update(task, advance=len(chunk), info=f"{len(records)} pairs")

    summary: dict[str, Any] = {
        "prompts": len(rows), "samples": len(rows) * k, "pairs": len(records), "skipped": skipped,
        "judge": cfg.judge, "mean_distinct_samples": sum(distinct_counts) / len(distinct_counts),
        "judge_chosen": _mean([r["scores"]["chosen"] for r in records]),
        "judge_rejected": _mean([r["scores"]["rejected"] for r in records]),
    }
    if judge is not None and "truncated" in judge.stats:
        summary["judge_truncated"] = judge.stats["truncated"]
    if gold_on:
        from tristage.world import score

        gc = [score(t, r["chosen"]).overall for t, r in zip(texts, records)]
        gr = [score(t, r["rejected"]).overall for t, r in zip(texts, records)]
        gaps = [c - r for c, r in zip(gc, gr) if c != r]
        summary.update(gold_chosen=_mean(gc), gold_rejected=_mean(gr),
                       gold_agreement=_mean([float(g > 0) for g in gaps]), gold_ties=len(records) - len(gaps))
    write_jsonl(cfg.out, records)
    summary["out"] = cfg.out

    print(f"label: {len(records)} pairs written to {cfg.out} from {len(rows)} prompts x {k} samples "
          f"(judge {cfg.judge}); skipped {skipped['identical']} with fewer than 2 distinct answers, "
          f"{skipped['tied']} with all answers scored equal; {summary['mean_distinct_samples']:.2f} distinct "
          f"answers per prompt on average")
    print(f"label: judge score chosen {_fmt(summary['judge_chosen'])} vs rejected {_fmt(summary['judge_rejected'])}"
          + (f"; {summary['judge_truncated']} judge inputs truncated" if summary.get("judge_truncated") else ""))
    if gold_on:
        print(f"label: gold score chosen {_fmt(summary['gold_chosen'])} vs rejected "
              f"{_fmt(summary['gold_rejected'])}; judge agrees with gold on {_fmt(summary['gold_agreement'])} of "
              f"{len(records) - summary['gold_ties']} pairs with a gold gap ({summary['gold_ties']} gold ties)")
    sys.stdout.flush()
    return summary
