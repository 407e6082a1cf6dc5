"""Judges behind two small interfaces: a scalar judge scores answers one by one, a pairwise judge compares two.

    judge = make_judge("rm:runs/rm/model")              # or gold | world | python:MODULE:FUNCTION | llm:PATH
    judge.scores(prompts, candidates)                   # ScalarJudge: one list of floats per prompt
    judge.compare(prompts, answers_a, answers_b)        # PairwiseJudge: P(A is better than B) per pair
    round_robin(judge, prompts, candidates)             # a pairwise judge over k answers: P(i beats j) [k, k]

Judges (`make_judge(spec)`; `tristage label` uses them, the arena will):
  rm:PATH                 scalar: a reward model folder's combined score (tristage.rollout.reward_scores: the
                          reward stage's rendering, with the RM folder's own tokenizer).
  gold                    scalar: the demo world's gold scorer, tristage.world.score(prompt, response).overall.
  python:MODULE:FUNCTION  scalar: any importable f(prompt: str, responses: list[str]) -> list[float] (MODULE may
                          also be a path to a .py file).
  llm:PATH                pairwise: a chat model folder. One plain forward pass over the fixed judge prompt
                          (JUDGE_PROMPT, one user message + the generation prompt): P(A) = softmax over the logits of
                          the tokens "A" and "B" at the answer position (the first token of each). With a judge
                          prompt (`judge_prompt="FILE[:NAME]"`, FastChat's judge_prompts.jsonl shape, e.g. MT-bench's
                          pair-v2): its system message, its prompt_template filled with {question}, {answer_a} and
                          {answer_b}, and the judge's reply started with what precedes "A" in its output_format
                          ("[[" for "[[A]]"), so the verdict is read at once, without the explanation it asks for.
  world                   pairwise: the demo world's simulated annotator (a noisy Bradley-Terry human stand-in):
                          P(A) is its probability of preferring A; `judgement` draws its choice, with ratings and
                          rationale, as in the world's own preference data.

Choices, and why:
- Prompts are chat messages ending with the user's turn; judges that read text only (gold, python, world) see the
  last user message.
- Interfaces are typing.Protocols: a judge is any object with the method, nothing to inherit. Each judge has
  `spec` (what made it) and `stats` (counters, e.g. "truncated" inputs of the model judges).
- `compare` answers for one presentation order: a model judge has a position bias, so `round_robin` asks every
  ordered pair (i as A, j as B) once and averages both orders, P(i beats j) = (P_A(i, j) + 1 - P_A(j, i)) / 2,
  which cancels it (k(k-1) questions per prompt, in one call so a model judge batches them).
- Model judges read inputs of at most max_len tokens (capped at the model's max positions); longer ones lose
  tokens from the left and are counted.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from tristage.io import UserError, read_jsonl
from tristage.model.hf import load_model
from tristage.model.score import load_reward_model
from tristage.rollout import pad_id, policy_tokenizer, reward_scores, reward_tokenizer, sampled_reward_ids, score_ids
from tristage.tokenizer import Tokenizer
from tristage.world import Annotator, Judgement, preference_probability, score

Messages = list[dict[str, str]]

JUDGE_PROMPT = ("Which response is better? Answer A or B.\n\n"
                "[Request]\n{request}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
                "Which response is better? Answer A or B.")


@runtime_checkable
class ScalarJudge(Protocol):
    """Scores each answer on its own."""

    spec: str
    stats: dict[str, int]

    def scores(self, prompts: Sequence[Messages], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        """One score per candidate, for each prompt."""
        ...


@runtime_checkable
class PairwiseJudge(Protocol):
    """Compares two answers to a prompt."""

    spec: str
    stats: dict[str, int]

    def compare(self, prompts: Sequence[Messages], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """P(a[i] is better than b[i]) as an answer to prompts[i], with a shown first."""
        ...


# ----------------------------------------------------------------------------- scalar judges
class GoldJudge:
    """The demo world's gold scorer (noiseless)."""

    def __init__(self, spec: str = "gold"):
        self.spec, self.stats = spec, {}

    def scores(self, prompts: Sequence[Messages], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        return [[score(p[-1]["content"], c).overall for c in cs] for p, cs in zip(prompts, candidates)]


def load_function(spec: str) -> Callable[[str, list[str]], list[float]]:
    """`module:function` or `path/to/file.py:function` -> the function."""
    mod, _, name = spec.rpartition(":")
    if not mod or not name:
        raise UserError(f"--judge python:{spec}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    try:  # a missing file or module, or one that does not parse, is the user's to fix: no traceback
        if mod.endswith(".py"):
            s = importlib.util.spec_from_file_location(Path(mod).stem, mod)
            if s is None or s.loader is None:
                raise UserError(f"--judge python:{spec}: cannot load {mod}")
            module = importlib.util.module_from_spec(s)
            s.loader.exec_module(module)
        else:
            module = importlib.import_module(mod)
    except (ImportError, OSError, SyntaxError) as e:
        raise UserError(f"--judge python:{spec}: cannot load {mod} ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"--judge python:{spec}: {mod} has no function {name!r}")
    return fn


class PythonJudge:
    """Any f(prompt text, responses) -> one finite number per response."""

    def __init__(self, spec: str, target: str):
        self.spec, self.stats, self.target = spec, {}, target
        self.fn = load_function(target)

    def scores(self, prompts: Sequence[Messages], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        out = []
        for p, cs in zip(prompts, candidates):
            s = self.fn(p[-1]["content"], list(cs))
            try:
                s = [float(x) for x in s]
            except (TypeError, ValueError):
                raise UserError(f"python judge {self.target}: expected a list of numbers, got {s!r:.100}") from None
            if len(s) != len(cs) or not all(math.isfinite(x) for x in s):
                raise UserError(f"python judge {self.target}: expected {len(cs)} finite scores, got {s!r:.100}")
            out.append(s)
        return out


class RewardJudge:
    """A reward model folder's combined score."""

    def __init__(self, spec: str, folder: str | Path, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 16, max_len: int = 1024):
        self.spec, self.stats = spec, {"truncated": 0}
        self.tok = reward_tokenizer(folder)  # checks the folder (a reward model, a chat template) before its weights
        self.rm = load_reward_model(folder, device=device, dtype=dtype).eval()
        self.batch_size, self.max_len = batch_size, max_len
        self._checked: tuple[Any, bool] | None = None  # (the last tokenizer asked about, is it this model's own)

    def scores(self, prompts: Sequence[Messages], candidates: Sequence[Sequence[str]]) -> list[list[float]]:
        flat_p = [p for p, cs in zip(prompts, candidates) for _ in cs]
        flat_r = [c for cs in candidates for c in cs]
        s = reward_scores(self.rm, self.tok, flat_p, flat_r, self.batch_size, self.max_len, stats=self.stats).tolist()
        return _regroup(s, candidates)

    def scores_sampled(self, prompts: Sequence[Messages], prompt_ids: Sequence[Sequence[int]],
                       answers: Sequence[Sequence[Sequence[int]]], stopped: Sequence[Sequence[bool]],
                       tokenizer: Any) -> list[list[float]] | None:
        """`scores` of sampled answers read as their own tokens (`sampled_reward_ids`: no decode and re-encode, so
        what is scored is what was sampled, and an answer of invalid UTF-8 is not re-encoded as replacement
        characters), when `tokenizer` (the policy's) is this reward model's own; None otherwise."""
        if not self._shares(tokenizer):
            return None
        ids: list[list[int]] = []
        for p, pid, a, st in zip(prompts, prompt_ids, answers, stopped):
            got = sampled_reward_ids(self.tok, p, pid, a, st, min(self.max_len, self.rm.config.max_position_embeddings))
            if got is None:
                return None
            ids += [x for x, _ in got]
            self.stats["truncated"] += sum(cut for _, cut in got)
        s = self.rm.combine(score_ids(self.rm, ids, pad_id(self.tok), self.batch_size)).tolist()
        return _regroup(s, answers)

    def _shares(self, tokenizer: Any) -> bool:
        if self._checked is None or self._checked[0] is not tokenizer:
            same = (isinstance(tokenizer, Tokenizer) and tokenizer.chat_template == self.tok.chat_template
                    and tokenizer.tok.to_str() == self.tok.tok.to_str())
            self._checked = (tokenizer, same)
        return self._checked[1]


def _regroup(flat: Sequence[float], groups: Sequence[Sequence[object]]) -> list[list[float]]:
    """`flat` cut into lists of the groups' sizes."""
    out, i = [], 0
    for g in groups:
        out.append(list(flat[i:i + len(g)]))
        i += len(g)
    return out


# ----------------------------------------------------------------------------- pairwise judges
def _conversation(messages: Messages) -> str:
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


@dataclass(frozen=True)
class JudgePrompt:
    """A pairwise judge prompt: an optional system message, a user message template with {question}, {answer_a} and
    {answer_b}, and the start of the judge's reply after which P("A") against P("B") is read."""

    name: str
    user: str
    system: str | None = None
    reply_prefix: str = ""

    def messages(self, question: str, a: str, b: str) -> Messages:
        user = {"role": "user", "content": self.user.format(question=question, answer_a=a, answer_b=b)}
        return ([{"role": "system", "content": self.system}] if self.system else []) + [user]


def load_judge_prompt(spec: str) -> JudgePrompt:
    """`FILE[:NAME]`: the judge prompt NAME (default: the first pairwise one that needs only {question},
    {answer_a} and {answer_b}, MT-bench's pair-v2 in FastChat's file) of a JSONL of {name, type, system_prompt,
    prompt_template, output_format} records, FastChat's judge_prompts.jsonl shape."""
    path, name = spec, None
    if not Path(spec).exists() and ":" in spec:
        path, _, name = spec.rpartition(":")
    found: list[str] = []
    for line, rec in read_jsonl(path):
        template = rec.get("prompt_template")
        if not isinstance(template, str) or not isinstance(rec.get("name"), str):
            raise UserError(f"{path}:{line}: a judge prompt needs `name` and `prompt_template` strings")
        found.append(rec["name"])
        if name is not None and rec["name"] != name:
            continue
        try:
            template.format(question="", answer_a="", answer_b="")
        except (KeyError, IndexError, ValueError) as e:
            if name is None:
                continue
            raise UserError(f"{path}:{line}: judge prompt {name!r} needs {e} in its template; a pairwise judge "
                            "fills only {question}, {answer_a} and {answer_b}") from None
        if name is None and rec.get("type", "pairwise") != "pairwise":
            continue
        system = rec.get("system_prompt")
        fmt = rec.get("output_format")
        prefix = fmt.split("A")[0] if isinstance(fmt, str) and "A" in fmt else ""
        return JudgePrompt(rec["name"], template, system if isinstance(system, str) and system else None, prefix)
    if name is not None:
        raise UserError(f"--judge-prompt {spec}: no judge prompt named {name!r} in {path} (names: {', '.join(found)})")
    raise UserError(f"--judge-prompt {spec}: no pairwise judge prompt with only {{question}}, {{answer_a}} and "
                    f"{{answer_b}} in {path}")


class LLMJudge:
    """A chat model asked JUDGE_PROMPT (or a JudgePrompt); see the module docstring."""

    def __init__(self, spec: str, folder: str | Path, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 16, max_len: int = 1024,
                 prompt: JudgePrompt | None = None):
        self.spec, self.stats, self.prompt = spec, {"truncated": 0}, prompt
        self.tok = policy_tokenizer(folder)  # checks the folder (a causal LM) before its weights
        if not self.tok.chat_template:
            raise UserError(f"{folder}: the judge's tokenizer has no chat_template")
        self.model = load_model(folder, device=device, dtype=dtype).eval()
        self.batch_size = batch_size
        self.max_len = min(max_len, self.model.config.max_position_embeddings)
        a, b = self.tok.encode("A"), self.tok.encode("B")
        if not a or not b or a[0] == b[0]:
            raise UserError(f"{folder}: the tokens 'A' and 'B' do not encode to distinct first tokens")
        self.ab = torch.tensor([a[0], b[0]])

    def prompt_ids(self, messages: Messages, a: str, b: str) -> list[int]:
        if self.prompt is None:
            text = JUDGE_PROMPT.format(request=_conversation(messages), a=a, b=b)
            ids = list(self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True))
        else:
            ids = list(self.tok.apply_chat_template(self.prompt.messages(_conversation(messages), a, b),
                                                    add_generation_prompt=True))
            ids += self.tok.encode(self.prompt.reply_prefix) if self.prompt.reply_prefix else []
        if len(ids) > self.max_len:
            self.stats["truncated"] += 1
            ids = ids[len(ids) - self.max_len:]
        return ids

    @torch.no_grad()
    def p_first(self, seqs: list[list[int]]) -> list[float]:
        """P("A") against "B" at the position after each sequence (length-sorted, right-padded batches)."""
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

    def compare(self, prompts: Sequence[Messages], a: Sequence[str], b: Sequence[str]) -> list[float]:
        return self.p_first([self.prompt_ids(p, x, y) for p, x, y in zip(prompts, a, b)])


class AnnotatorJudge:
    """The demo world's simulated annotator: P(A) from its Bradley-Terry model on gold scores; `judgement` draws."""

    def __init__(self, spec: str = "world", temperature: float = 0.1, seed: int = 0):
        self.spec, self.stats = spec, {}
        self.annotator = Annotator(temperature, seed)

    def compare(self, prompts: Sequence[Messages], a: Sequence[str], b: Sequence[str]) -> list[float]:
        t = self.annotator.temperature
        return [preference_probability(score(p[-1]["content"], x).overall, score(p[-1]["content"], y).overall, t)
                for p, x, y in zip(prompts, a, b)]

    def judgement(self, prompt: Messages, a: str, b: str) -> Judgement:
        """The annotator's (noisy, seeded by its seed, the prompt and both answers) label, ratings and rationale."""
        return self.annotator.compare(prompt[-1]["content"], a, b)


def round_robin(judge: PairwiseJudge, prompts: Sequence[Messages],
                candidates: Sequence[Sequence[str]]) -> list[Tensor]:
    """P(i beats j) [m, m] for each prompt's m candidates, both orders averaged (see above); diagonal 0."""
    where = [(k, i, j) for k, cs in enumerate(candidates) for i in range(len(cs)) for j in range(len(cs)) if i != j]
    p_a = judge.compare([prompts[k] for k, _, _ in where], [candidates[k][i] for k, i, _ in where],
                        [candidates[k][j] for k, _, j in where])
    first = [torch.full((len(cs), len(cs)), math.nan) for cs in candidates]
    for (k, i, j), p in zip(where, p_a):
        first[k][i, j] = p
    out = []
    for f in first:
        beats = (f + (1 - f.T)) / 2
        beats.fill_diagonal_(0.0)
        out.append(beats)
    return out


def make_judge(spec: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               batch_size: int = 16, max_len: int = 1024, annotator_temperature: float = 0.1,
               seed: int = 0, judge_prompt: str | None = None) -> ScalarJudge | PairwiseJudge:
    """The judge for SPEC (rm:PATH | gold | world | python:MODULE:FUNCTION | llm:PATH). batch_size and max_len: the
    model judges' forward passes; annotator_temperature and seed: the world annotator's noise; judge_prompt
    (FILE[:NAME], llm: only): the judge prompt to ask with (load_judge_prompt)."""
    kind, _, rest = spec.partition(":")
    if judge_prompt is not None and not (kind == "llm" and rest):
        raise UserError(f"--judge-prompt applies to llm:PATH judges only (the judge is {spec!r})")
    if kind == "world" and not rest:
        return AnnotatorJudge(spec, annotator_temperature, seed)
    if kind == "gold" and not rest:
        return GoldJudge(spec)
    if kind == "python" and rest:
        return PythonJudge(spec, rest)
    if kind == "rm" and rest:
        return RewardJudge(spec, rest, device, dtype, batch_size, max_len)
    if kind == "llm" and rest:
        prompt = load_judge_prompt(judge_prompt) if judge_prompt is not None else None
        return LLMJudge(spec, rest, device, dtype, batch_size, max_len, prompt)
    raise UserError(f"--judge {spec!r}: expected rm:PATH, gold, world, python:MODULE:FUNCTION or llm:PATH")
