"""The generation engine: one batched sampler shared by chat (streaming), RL rollouts (log-probs) and arena battles.

    engine = Engine(model)
    outs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=64, temperature=0.8, top_p=0.95,
                                                                stop_ids=[0], seed=1, logprobs=True))
    outs[0].tokens, outs[0].finish_reason, outs[0].logprobs
    for token, finish_reason in engine.stream([1, 2, 3], params): ...

Choices, and why (figures: bench/RESULTS.md, tiny 1M Llama on 2 CPU cores, where a decode step is per-op overhead):
- One prefill forward over the left-padded batch, then one-token decode steps. Left padding puts every row's next
  token in the same cache slot, so the model's `KVCache` (one fill pointer for all rows) works unchanged; padding is
  masked with a per-row key mask and per-row position ids (position = slot - pad), which keeps every row's output
  equal to running it alone (tested). Padded queries attend to themselves only, so no row of the prefill softmax
  is empty (an empty one gives NaN keys that would poison later steps as 0 * NaN).
- Everything per-call is built once and sliced per step: the cache is preallocated to prompt + max_new_tokens,
  the key mask [B, L] and positions [B, L] are views per step (`valid[:, None, None, :t + 1]`), generated tokens
  go into a preallocated [B, max_new] buffer. With no padding (one prompt, equal lengths) the mask is None, which
  takes SDPA's unmasked path.
- No host sync per step in `generate`: stop tokens are looked for every `check_every` steps (a `.tolist()` is a
  sync on a GPU and a few ops on a CPU); the result is trimmed at the first stop token anyway, so checking late only
  costs up to check_every - 1 wasted steps. `stream` syncs every step by nature.
- Finished rows leave the batch (`KVCache.select`, a copy of the cache) once `compact_at` (25%) of the rows in it
  have finished; until then they keep decoding, masked out of the results. Measured on rollouts of mixed lengths
  (bench/RESULTS.md): leaving beats masking by 1.2x at batch 16 and 1.9x at 64; leaving at every single finished
  row is slower than waiting for a quarter (one cache copy each time).
- Sampling: temperature, then top-k, then top-p (the order of transformers' warpers), as a pure function
  `filter_logits`; the draw is argmax(p / E) with E ~ Exp(1) from a seeded `torch.Generator` (the same as
  multinomial sampling, without a sync), so the same seed and inputs give the same output. E is drawn for the whole
  original batch every step, so a row's tokens do not depend on when other rows leave. temperature 0 = greedy.
  With one generator per prompt (RL rollouts: a row's tokens depend on its own seed only) the draw is the inverse
  CDF instead: the first token whose cumulative probability exceeds U ~ U(0, 1), each row's U for every step drawn
  in one call at its first step (one random number per row and step rather than V, and one call per row rather
  than one per row and step: a rollout of 16 x 64 tokens of the 1M benchmark model, one thread, best of 15: 117
  against 133 ms).
- Log-probs (`logprobs=True`) are log_softmax of the *raw* logits at the sampled token, fp32: the policy's own
  log-likelihood that PPO/GRPO ratios and KL need, independent of temperature / top-k / top-p.
  `sampling_logprobs=True` adds the log-prob under the processed distribution actually sampled from (0 for greedy).
- `compile=True` compiles the decode step with torch.compile (inductor C++ on CPU) with dynamic shapes over
  `SlotKVCache` (per-layer buffers written at a slot tensor, attention length taken from the mask's shape), so one
  graph serves every batch size and length (batch 1 gets its own) and rows can still leave the batch. It pays only
  after its compile time (bench/RESULTS.md); the default is eager, the fastest for a chat turn or a few batches.
- The loop reads as its parts, in order: `_prefill` (prompts -> a `Batch` and the first logits), `Batch.sample`
  (one token per row), `Batch.stop` (rows that hit a stop token finish), `Batch.compact` (finished rows leave),
  `_decode_step` (one token through the model). `Batch` holds everything one call's rows need (cache, positions,
  key validity, generated tokens, finished flags).
- The server's requests come and go while others decode: `ContinuousBatch` (below) gives each request a cache row
  with its own slots from 0 and its own position ids (`RowKVCache` writes row r's key at slot lens[r]), so a row's
  keys never move when others join or leave, and a row equals the request alone (tested). It reuses the prefill
  mask, the inverse-CDF sampler (per row: each request its own temperature, top-k, top-p and generator, whose
  uniforms it draws at its first token) and the raw-logit log-probs; `generate` keeps its one-fill-pointer cache,
  the fastest for a batch that starts together (RL rollouts, arena answers: bench/RESULTS.md).
- On a CPU, `ContinuousBatch` decodes with a copy of the model (its tensors shared) whose linear layers are oneDNN
  calls on weights packed once (serve/packed.py; MKL's GEMM takes its AVX2 path on AMD processors, oneDNN is about
  twice as fast at these shapes). `Engine` keeps nn.Linear, so RL rollouts are unchanged to the bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from tristage.model.gpt import GPT, KVCache
from tristage.serve.packed import packed


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy (top_k / top_p ignored)
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    stop_ids: Sequence[int] = ()  # a row ends at (and includes) the first of these
    seed: int | None = None  # None: torch's global RNG
    logprobs: bool = False  # log_softmax(raw logits) at each sampled token (what RL needs)
    sampling_logprobs: bool = False  # log-prob under the processed (temperature/top-k/top-p) distribution


@dataclass
class Completion:
    tokens: list[int]  # generated ids; ends with the stop token when finish_reason == "stop"
    finish_reason: Literal["stop", "length"]
    logprobs: list[float] | None = None
    sampling_logprobs: list[float] | None = None
    prompt_tokens: int = 0


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Top-k then top-p (nucleus) filtering: logits [..., V] -> the same with removed entries at -inf.

    top-p keeps the smallest set of most likely tokens whose probability reaches top_p: a token is kept when the
    mass of the tokens ranked above it is < top_p (so the most likely token is always kept).
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs
        remove = (before >= top_p).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(remove, -math.inf)
    return logits


def sample(logits: Tensor, p: SamplingParams, noise: Tensor | None,
           uniform: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """logits [B, V] (fp32) -> tokens [B] and, if asked, their log-probs under the processed distribution [B].

    noise [B, V] ~ Exp(1) (unused when greedy): argmax(probs / noise) is a draw from probs (the exponential race).
    Or uniform [B] ~ U(0, 1): the token where the cumulative probability first exceeds it (the inverse CDF: one
    random number per row instead of V).
    """
    if p.temperature == 0:
        tok = logits.argmax(-1)
        return tok, (torch.zeros(tok.shape, device=logits.device) if p.sampling_logprobs else None)
    logits = filter_logits(logits / p.temperature, p.top_k, p.top_p)
    if uniform is not None:
        cdf = logits.softmax(-1).cumsum(-1)
        at = (uniform * cdf[:, -1])[:, None]  # scaled by the total: rounding cannot put it past the last token
        tok = torch.searchsorted(cdf, at, right=True)[:, 0].clamp_(max=logits.shape[-1] - 1)
    else:
        tok = (logits.softmax(-1) / noise).argmax(-1)
    lp = logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0] if p.sampling_logprobs else None
    return tok, lp


def prefill_mask(valid: Tensor, T: int, L: int, window: int | None) -> Tensor:
    """Mask [B, 1, T, L] for a prompt in slots 0..T-1: causal, valid keys only (valid [B, >=L]), within the sliding
    window; a padded query attends only to itself, so no softmax row is empty."""
    q, k = torch.arange(T, device=valid.device)[:, None], torch.arange(L, device=valid.device)[None, :]
    m = k <= q
    if window:
        m = m & (k > q - window)
    m = m[None, None] & valid[:, None, None, :L]
    return m | (k == q)


class SlotKVCache:
    """The cache seen by a compiled decode step: per-layer k, v [B, kv_heads, max_len, head_dim], new keys written at
    the slot indices `slot` (a tensor, so the graph does not specialise on the step), attention over the first `n`
    slots. `n` is the mask's last dimension, a dynamic size: one compiled graph serves every length and batch size."""

    def __init__(self, ks: list[Tensor], vs: list[Tensor], slot: Tensor, n: int):
        self.ks, self.vs, self.slot, self.n = ks, vs, slot, n

    @classmethod
    def allocate(cls, model: GPT, batch: int, max_len: int, dtype: torch.dtype) -> SlotKVCache:
        c, dev = model.config, model.rope_cos.device
        shape = (batch, c.num_key_value_heads, max_len, c.head_dim)
        new = lambda: [torch.zeros(shape, device=dev, dtype=dtype) for _ in range(c.num_hidden_layers)]
        return cls(new(), new(), torch.zeros(0, dtype=torch.long, device=dev), 0)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.ks[layer][:, :, self.slot] = k  # index_put_ on a whole buffer: inductor keeps it in place
        self.vs[layer][:, :, self.slot] = v
        return self.ks[layer][:, :, : self.n], self.vs[layer][:, :, : self.n]

    def advance(self, n: int) -> None:  # the engine moves `slot`; a Python counter would recompile every step
        pass

    def select(self, rows: Tensor) -> None:
        self.ks, self.vs = [k[rows] for k in self.ks], [v[rows] for v in self.vs]


def first_stops(tokens: Tensor, stops: Tensor) -> list[int]:
    """tokens [B, n >= 1], stops [S] -> for each row, the index of its first stop token, or -1 (one host sync)."""
    hit = torch.isin(tokens, stops)
    return torch.where(hit.any(1), hit.int().argmax(1), -1).tolist()


@dataclass
class Batch:
    """The state of one generate call: b rows still in the batch (of `size` prompts), L = T + max_new slots.

    Row r of every tensor is prompt `rows[r]`; `compact` drops finished rows from all of them at once. A finished
    row that has not left yet keeps decoding (its `live` flag is off and its results are already taken).
    """

    size: int  # prompts in the call: the sampling noise is drawn for all of them every step
    prompt_lens: list[int]  # by prompt index
    T: int  # prompt slots (the longest prompt; shorter ones are left-padded)
    max_new: int  # steps at most
    cache: KVCache | SlotKVCache
    kpos: Tensor  # [L] slot indices
    valid: Tensor  # [b, L] bool: the slot holds a real token, not padding
    pos: Tensor  # [b, L] position id of each slot (slot - padding, clamped at 0)
    window: int | None  # the sliding window, when the call reaches past it
    padded: bool  # some row in the batch has padding (otherwise decode steps need no mask)
    tokens: Tensor  # [b, max_new] generated ids
    logprobs: Tensor | None  # [b, max_new] fp32, raw-logit log-probs of the generated ids
    sampling_logprobs: Tensor | None  # [b, max_new] fp32, under the processed distribution
    rows: list[int]  # prompt index of each row
    live: list[bool]  # rows not finished yet
    completions: list[Completion | None]  # by prompt index, filled as rows finish
    last: Tensor | None = None  # [b] the tokens sampled at the latest step
    row_idx: Tensor | None = None  # `rows` as a tensor, once rows have left
    checked: int = 0  # steps already searched for stop tokens
    uniform: Tensor | None = None  # [size, max_new]: with one generator per prompt, its draws for every step

    def sample(self, step: int, logits: Tensor, p: SamplingParams,
               generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
        """Draw this step's tokens from logits [b, V] and record them (and their log-probs) at `step`: -> [b]."""
        logits = logits.float()
        noise = u = None
        if isinstance(generator, list):  # one generator per prompt: a row's draws depend on its own seed only
            if p.temperature != 0 and self.uniform is None:  # every step's at once (the first call has all rows)
                self.uniform = torch.stack([torch.rand(self.max_new, generator=g, device=g.device)
                                            for g in generator])
            if self.uniform is not None:
                u = self.uniform[:, step] if self.row_idx is None else self.uniform[self.row_idx, step]
        elif p.temperature != 0:  # drawn for the whole original batch: a row's draws do not depend on who left
            noise = torch.empty(self.size, logits.shape[-1], device=logits.device).exponential_(1, generator=generator)
            noise = noise[self.row_idx] if self.row_idx is not None else noise
        tok, slp = sample(logits, p, noise, u)
        self.tokens[:, step] = tok
        if self.logprobs is not None:
            self.logprobs[:, step] = logits.log_softmax(-1).gather(-1, tok[:, None])[:, 0]
        if self.sampling_logprobs is not None:
            self.sampling_logprobs[:, step] = slp
        self.last = tok
        return tok

    def running(self, tok: Tensor) -> tuple[list[int], list[int]]:
        """The prompt indices of the live rows and their tokens in tok [b] (a host sync)."""
        toks = tok.tolist()
        return [self.rows[r] for r in range(len(self.rows)) if self.live[r]], \
            [toks[r] for r in range(len(self.rows)) if self.live[r]]

    def stop(self, stops: Tensor, upto: int) -> None:
        """Finish every live row with a stop token among steps [checked, upto), at (and including) the first."""
        for r, f in enumerate(first_stops(self.tokens[:, self.checked:upto], stops)):
            if self.live[r] and f >= 0:
                self.finish(r, self.checked + f + 1, "stop")
        self.checked = upto

    def finish(self, r: int, n: int, reason: Literal["stop", "length"]) -> None:
        """Row r's completion is its first n tokens."""
        lps, slps = self.logprobs, self.sampling_logprobs
        self.completions[self.rows[r]] = Completion(
            self.tokens[r, :n].tolist(), reason, lps[r, :n].tolist() if lps is not None else None,
            slps[r, :n].tolist() if slps is not None else None, self.prompt_lens[self.rows[r]])
        self.live[r] = False

    def compact(self) -> None:
        """Finished rows leave the batch: the cache and every per-row tensor keep only the live rows."""
        keep = [r for r in range(len(self.rows)) if self.live[r]]
        idx = torch.tensor(keep, device=self.tokens.device)
        self.cache.select(idx)
        self.tokens, self.valid, self.pos = self.tokens[idx], self.valid[idx], self.pos[idx]
        self.last = self.last[idx] if self.last is not None else None
        self.logprobs = self.logprobs[idx] if self.logprobs is not None else None
        self.sampling_logprobs = self.sampling_logprobs[idx] if self.sampling_logprobs is not None else None
        self.rows, self.live = [self.rows[r] for r in keep], [True] * len(keep)
        self.row_idx = torch.tensor(self.rows, device=self.tokens.device)
        self.padded = self.padded and bool((~self.valid[:, : self.T]).any())


class Engine:
    """Batched prefill + decode over a `GPT`. Not thread-safe: one generate call at a time."""

    def __init__(self, model: GPT, *, compile: bool = False, check_every: int = 4, compact_at: float = 0.25):
        self.model = model
        self.compile = compile
        self.check_every = check_every
        self.compact_at = compact_at
        if compile:
            # cpp_wrapper: the graph's kernels are called from C++, not Python (per-step overhead is the cost here)
            self._compiled = torch.compile(self._slot_step, dynamic=True, fullgraph=True,
                                           options={"cpp_wrapper": True})

    def _slot_step(self, tok: Tensor, pos: Tensor, mask: Tensor, ks: list[Tensor], vs: list[Tensor],
                   slot: Tensor) -> Tensor:
        return self.model(tok, pos, mask, SlotKVCache(ks, vs, slot, mask.shape[-1]))[:, -1]

    # ---- public API ---------------------------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | None = None, *,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 on_token: Callable[[list[int], list[int]], None] | None = None) -> list[Completion]:
        """Complete every prompt (lists of token ids). on_token(rows, tokens), if given, is called after each step
        with the prompt indices still running and their new tokens (this syncs every step). `generator` may be a
        list with one generator per prompt: each row then draws from its own, so its tokens depend only on its
        prompt and seed, not on the other prompts of the call (RL: the same samples however the rollouts are split
        over processes and calls)."""
        results: list[Completion | None] = [None] * len(prompts)
        for rows, toks in self._run(prompts, params or SamplingParams(), generator, results, on_token is not None):
            on_token(rows, toks)  # type: ignore[misc]
        return results  # type: ignore[return-value]

    def stream(self, prompt: Sequence[int], params: SamplingParams | None = None, *,
               generator: torch.Generator | None = None) -> Iterator[tuple[int, str | None]]:
        """Yield (token, finish_reason) as each token is produced; finish_reason is None until the last token."""
        results: list[Completion | None] = [None]
        pending: int | None = None
        for _, toks in self._run([prompt], params or SamplingParams(), generator, results, True):
            if pending is not None:
                yield pending, None
            pending = toks[0]
        if pending is not None:
            yield pending, results[0].finish_reason  # type: ignore[union-attr]

    # ---- the loop -----------------------------------------------------------------------------------------------
    def _run(self, *args) -> Iterator[tuple[list[int], list[int]]]:
        training = self.model.training  # generating between training steps (RL) must not leave the model in eval
        self.model.eval()
        try:
            yield from self._loop(*args)
        finally:
            self.model.train(training)

    @torch.inference_mode()
    def _loop(self, prompts: Sequence[Sequence[int]], p: SamplingParams,
              generator: torch.Generator | list[torch.Generator] | None,
              results: list[Completion | None], stream: bool) -> Iterator[tuple[list[int], list[int]]]:
        """Yields (prompt indices, tokens) of the live rows after each step when `stream`; fills `results`."""
        batch, logits = self._prefill(prompts, p)
        dev = batch.tokens.device
        if generator is None and p.seed is not None:
            generator = torch.Generator(dev).manual_seed(p.seed)
        stops = torch.tensor(list(p.stop_ids), dtype=torch.long, device=dev) if p.stop_ids else None
        for i in range(batch.max_new):
            tok = batch.sample(i, logits, p, generator)
            if stream:
                yield batch.running(tok)
            if stops is not None and (stream or (i + 1) % self.check_every == 0 or i == batch.max_new - 1):
                batch.stop(stops, i + 1)
                if not any(batch.live):
                    break
                if batch.live.count(False) >= max(1, self.compact_at * len(batch.rows)):
                    batch.compact()
            if i == batch.max_new - 1:
                break
            logits = self._decode_step(batch, i)
        for r in range(len(batch.rows)):
            if batch.live[r]:
                batch.finish(r, batch.max_new, "length")
        results[:] = batch.completions

    def _prefill(self, prompts: Sequence[Sequence[int]], p: SamplingParams) -> tuple[Batch, Tensor]:
        """Left-pad the prompts into one forward that fills the cache: -> the batch and the last logits [B, V].

        Everything per call is built here once (cache, key validity, positions, output buffers) and sliced later.
        """
        model, cfg = self.model, self.model.config
        dev = model.rope_cos.device
        dtype = next(model.parameters()).dtype
        if not prompts or any(len(x) == 0 for x in prompts):
            raise ValueError("every prompt needs at least one token")
        lens = [len(x) for x in prompts]
        B, T = len(prompts), max(lens)
        max_new = min(p.max_new_tokens, cfg.max_position_embeddings - T)
        if max_new <= 0:
            raise ValueError(f"prompt of {T} tokens leaves no room within max_position_embeddings "
                             f"{cfg.max_position_embeddings}")
        total = T + max_new

        pad = torch.tensor([T - n for n in lens], device=dev)
        ids = torch.zeros(B, T, dtype=torch.long, device=dev)
        for i, x in enumerate(prompts):
            ids[i, T - len(x):] = torch.tensor(list(x), dtype=torch.long)
        kpos = torch.arange(total, device=dev)
        valid = kpos[None, :] >= pad[:, None]  # [B, total]
        pos = (kpos[None, :] - pad[:, None]).clamp_(min=0)
        window = cfg.sliding_window if cfg.sliding_window is not None and total > cfg.sliding_window else None
        padded = any(n != T for n in lens)

        if self.compile:
            cache: KVCache | SlotKVCache = SlotKVCache.allocate(model, B, total, dtype)
            cache.slot, cache.n = kpos[:T], T
        else:
            cache = KVCache(cfg, B, total, dev, dtype)
        mask = prefill_mask(valid, T, T, window) if padded or window else None
        logits = model(ids, pos[:, :T], mask, cache, last_only=True)[:, -1]

        batch = Batch(size=B, prompt_lens=lens, T=T, max_new=max_new, cache=cache, kpos=kpos, valid=valid, pos=pos,
                      window=window, padded=padded, tokens=torch.empty(B, max_new, dtype=torch.long, device=dev),
                      logprobs=torch.empty(B, max_new, device=dev) if p.logprobs else None,
                      sampling_logprobs=torch.empty(B, max_new, device=dev) if p.sampling_logprobs else None,
                      rows=list(range(B)), live=[True] * B, completions=[None] * B)
        return batch, logits

    def _decode_step(self, batch: Batch, step: int) -> Tensor:
        """Feed the tokens sampled at `step` through the model (into cache slot T + step): -> next logits [b, V]."""
        t = batch.T + step
        window, cache = batch.window, batch.cache
        m = batch.valid[:, None, None, :t + 1] if batch.padded or window or self.compile else None  # compiled: n
        if window:  # from the mask's shape
            m = m & (batch.kpos[:t + 1] > t - window)
        tok, pos = batch.last[:, None], batch.pos[:, t:t + 1]  # type: ignore[index]
        if isinstance(cache, SlotKVCache):
            cache.slot = batch.kpos[t:t + 1]
            return self._compiled(tok, pos, m, cache.ks, cache.vs, cache.slot)
        return self.model(tok, pos, m, cache)[:, -1]


# ----------------------------------------------------------------------------- continuous batching
class RowKVCache(SlotKVCache):
    """Per-row slots: row r's new key goes to its own slot `slot[r]` (every row fills its slots 0, 1, 2, ... from
    its first token, whenever it joined), attention over the first `n` slots with a per-row key mask.

    The write is one `index_copy_` into the buffer seen as [rows * heads * slots, head_dim], at flat indices
    computed once per step for all layers (indexing rows and slots together costs ~5x more on a CPU)."""

    def __init__(self, ks: list[Tensor], vs: list[Tensor], slot: Tensor, n: int):
        super().__init__(ks, vs, slot, n)
        R, H, L, _ = ks[0].shape
        rows = torch.arange(R, device=slot.device)
        heads = torch.arange(H, device=slot.device)
        self.flat = ((rows[:, None] * H + heads[None, :]) * L + slot[:, None]).reshape(-1)  # [R * H]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        D = k.shape[-1]  # k, v [B, kv_heads, 1, head_dim]
        self.ks[layer].view(-1, D).index_copy_(0, self.flat, k.reshape(-1, D))
        self.vs[layer].view(-1, D).index_copy_(0, self.flat, v.reshape(-1, D))
        return self.ks[layer][:, :, : self.n], self.vs[layer][:, :, : self.n]


@dataclass
class Request:
    """One sequence to complete in a `ContinuousBatch`. `key` is the caller's handle; it comes back with every
    token. A row draws from its own generator (None: an unseeded one), so its tokens do not depend on its
    neighbours. `top_logprobs` > 0 also returns that many most likely tokens (raw log-probs) at each step."""

    key: object
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None = None
    top_logprobs: int = 0


@dataclass
class Token:
    """One step of one request: the token, and its finish reason when it is the last one."""

    key: object
    token: int
    finish_reason: Literal["stop", "length"] | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class Prefilled:
    """A request whose prompt went through the model already (`prefill`, here or in a prefill process): its keys
    and values k, v [layers, kv_heads, len(prompt), head_dim] and the logits [V] after its last prompt token."""

    req: Request
    k: Tensor
    v: Tensor
    logits: Tensor


def check_prompt(prompt: Sequence[int], context: int) -> None:
    """ValueError when a prompt cannot be served: empty, or no room left within the context."""
    if not prompt:
        raise ValueError("every prompt needs at least one token")
    if len(prompt) >= context:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room within max_position_embeddings {context}")


PREFILL_TOKENS = 8192  # one prefill's budget: rows x the longest prompt (padding counted)


def prefill_count(reqs: Sequence[Request], room: int, budget: int = PREFILL_TOKENS) -> int:
    """How many of the first `reqs` (at most `room`) one right-padded prefill takes within `budget` padded tokens;
    the first always (a prompt longer than the budget still goes, alone)."""
    n = min(1, room, len(reqs))
    while n < min(room, len(reqs)) and max(len(q.prompt) for q in reqs[: n + 1]) * (n + 1) <= budget:
        n += 1
    return n


@torch.inference_mode()
def prefill(model: GPT, reqs: Sequence[Request]) -> list[Prefilled]:
    """The prompts of `reqs` through `model` as one right-padded batch (plain causal attention is exact for the real
    tokens; the padding's keys are cut off): -> each request's keys, values and last logits."""
    cfg, dev = model.config, model.rope_cos.device
    dtype = next(model.parameters()).dtype
    lens = [len(q.prompt) for q in reqs]
    T = max(lens)
    ids = torch.zeros(len(reqs), T, dtype=torch.long, device=dev)
    for i, q in enumerate(reqs):
        ids[i, : lens[i]] = torch.tensor(q.prompt, dtype=torch.long)
    cache = KVCache(cfg, len(reqs), T, dev, dtype)
    mask = None
    if cfg.sliding_window is not None and T > cfg.sliding_window:
        mask = prefill_mask(torch.ones(len(reqs), T, dtype=torch.bool, device=dev), T, T, cfg.sliding_window)
    h = model.hidden_states(ids, None, mask, cache)
    logits = model.logits(h[torch.arange(len(reqs), device=dev), torch.tensor(lens, device=dev) - 1])
    return [Prefilled(q, cache.k[:, i, :, :n], cache.v[:, i, :, :n], logits[i]) for i, (q, n) in
            enumerate(zip(reqs, lens))]


@dataclass
class _Row:
    req: Request
    max_new: int
    stops: frozenset[int]
    generated: int = 0
    uniform: Tensor | None = None  # a sampled row's U(0, 1) draws, one per token, drawn at its first


def sample_rows(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                uniform: Tensor | None) -> Tensor:
    """`sample` with a temperature, top-k and top-p per row: logits [b, V] (fp32), the others [b] -> tokens [b].

    Rows with temperature 0 take the argmax; the others the inverse CDF of softmax(filtered logits / T) at their
    uniform [b] ~ U(0, 1) (the token where the cumulative probability first exceeds it).
    """
    greedy = logits.argmax(-1)
    if uniform is None:
        return greedy
    z = logits / torch.where(temperature > 0, temperature, 1.0)[:, None]
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):  # top-k, then top-p on what is left (as filter_logits)
        sorted_z, order = z.sort(dim=-1, descending=True)
        rank = torch.arange(z.shape[-1], device=z.device)[None, :]
        cut = rank >= torch.where(top_k > 0, top_k, z.shape[-1])[:, None]
        probs = sorted_z.masked_fill(cut, -math.inf).softmax(-1)
        remove = cut | (probs.cumsum(-1) - probs >= top_p[:, None])
        z = z.masked_fill(remove.scatter(-1, order, remove), -math.inf)
    cdf = z.softmax(-1).cumsum(-1)
    at = (uniform * cdf[:, -1])[:, None]  # scaled by the total: rounding cannot put it past the last token
    tok = torch.searchsorted(cdf, at, right=True)[:, 0].clamp_(max=z.shape[-1] - 1)
    return torch.where(temperature > 0, tok, greedy)


class ContinuousBatch:
    """Requests that join and leave a running batch between decode steps (the server's engine).

        batch = ContinuousBatch(model, max_rows=32)
        batch.add(Request(key, prompt_ids, SamplingParams(max_new_tokens=64, stop_ids=[2])))
        while batch.busy:
            for t in batch.step(): ...       # Token(key, token, finish_reason, logprob, top_logprobs)
        batch.cancel(key)                    # the row leaves at once (a client went away)
        batch.add_prefilled(prefill(model, [req])[0])   # a request prefilled elsewhere (a prefill process)

    Each request has a row of the cache, and each row its own slots from 0: row r's next token goes to slot
    lens[r] with position id lens[r] (`RowKVCache`), and attends to its slots 0..lens[r] (a per-row key mask
    over the first max(lens) + 1 slots). So a row's keys never move when others join or leave, and its output is
    that of the request alone (greedy: tested against `Engine.generate`). A step is one decode forward for the
    rows already running, then new requests join: those prefilled elsewhere (`add_prefilled`: a prefill process
    beside this one, tristage/serve/batcher.py), then the waiting ones through one right-padded `prefill`; their
    keys are copied into free rows, and their logits give each joiner its first token in the same step. A
    finished or cancelled row is a hole that the next joiner reuses; holes still ride along in the decode forward
    (as the engine's finished rows do), so once a quarter of the rows are holes and nobody waits, the cache is
    compacted (one copy).
    The cache grows on demand (rows up to max_rows, slots doubling up to max_position_embeddings), so an idle
    server holds little memory. Not thread-safe: one loop drives it (the engine process, tristage/serve/batcher.py).
    """

    def __init__(self, model: GPT, *, max_rows: int = 32, max_prefill_tokens: int = PREFILL_TOKENS,
                 compact_at: float = 0.25):
        self.model = packed(model)  # on a CPU: its linear layers on oneDNN with packed weights (serve/packed.py)
        self.max_rows, self.max_prefill_tokens, self.compact_at = max_rows, max_prefill_tokens, compact_at
        cfg = model.config
        self.context = cfg.max_position_embeddings
        self.window = cfg.sliding_window
        self.dev, self.dtype = model.rope_cos.device, next(model.parameters()).dtype
        self.waiting: list[Request] = []
        self.prefilled: list[Prefilled] = []  # prefilled elsewhere, waiting for a row
        self.rows: list[_Row | None] = []  # by cache row; None = free
        shape = (0, cfg.num_key_value_heads, 0, cfg.head_dim)
        # the cache's buffers hold room for more rows than run (kb, vb); ks, vs are views of their first rows
        self.kb = [torch.zeros(shape, device=self.dev, dtype=self.dtype) for _ in range(cfg.num_hidden_layers)]
        self.vb = [torch.zeros(shape, device=self.dev, dtype=self.dtype) for _ in range(cfg.num_hidden_layers)]
        self.ks, self.vs = list(self.kb), list(self.vb)
        self.lens = torch.zeros(0, dtype=torch.long, device=self.dev)  # tokens in each row's cache
        self.last = torch.zeros(0, dtype=torch.long, device=self.dev)  # the token each row feeds next
        self.kpos = torch.arange(self.context, device=self.dev)

    # ---- public -------------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.waiting) or bool(self.prefilled) or self.running > 0

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    def add(self, req: Request) -> None:
        """Queue a request; it joins at the next step. ValueError when its prompt leaves no room in the context."""
        check_prompt(req.prompt, self.context)
        self.waiting.append(req)

    def add_prefilled(self, p: Prefilled) -> None:
        """Queue a request whose prompt was prefilled elsewhere (by `prefill` on this model's weights); it joins at
        the next step that has a row for it."""
        self.prefilled.append(p)

    @torch.inference_mode()  # the batch's tensors are inference tensors: changed only in inference mode
    def cancel(self, key: object) -> bool:
        """Drop the request `key` (waiting or running); False when there is none."""
        for i, req in enumerate(self.waiting):
            if req.key == key:
                del self.waiting[i]
                return True
        for i, p in enumerate(self.prefilled):
            if p.req.key == key:
                del self.prefilled[i]
                return True
        for r, row in enumerate(self.rows):
            if row is not None and row.req.key == key:
                self._free(r)
                return True
        return False

    @torch.inference_mode()
    def reset(self) -> list[object]:
        """Drop every request (after a failed step): -> their keys."""
        keys = ([q.key for q in self.waiting] + [p.req.key for p in self.prefilled]
                + [r.req.key for r in self.rows if r is not None])
        self.waiting, self.prefilled, self.rows = [], [], [None] * len(self.rows)
        self.lens.zero_()
        self.last.zero_()
        return keys

    @torch.inference_mode()
    def step(self) -> list[Token]:
        """Requests prefilled elsewhere join (their first token), one token for every running request (a decode
        step, the joiners' second), then the waiting ones join (a prefill: their first token)."""
        out = self.admit()
        live = [r for r, row in enumerate(self.rows) if row is not None]
        if live:
            out += self._emit(live, self._decode(live))
        joined, logits = self._join() if self.waiting or self.prefilled else ([], None)
        if joined:
            out += self._emit(joined, logits)
        elif self.rows and len(self.rows) - self.running >= max(1, self.compact_at * len(self.rows)):
            self._compact()
        return out

    @torch.inference_mode()
    def admit(self) -> list[Token]:
        """Requests prefilled elsewhere take free rows: -> their first tokens (no forward pass: their logits came
        with them). `step` begins with it; a caller may call it first to send those tokens before the step."""
        joined, logits = self._join(waiting=False) if self.prefilled else ([], None)
        return self._emit(joined, logits) if joined else []

    # ---- the parts ----------------------------------------------------------------------------------------------
    def _decode(self, live: list[int]) -> Tensor:
        """Feed every row's last token (holes too: they attend to their slot 0 only): -> logits of the live rows."""
        n = int(self.lens.max()) + 1
        self._grow(len(self.rows), n)
        m = self.kpos[None, :n] <= self.lens[:, None]
        if self.window is not None and n > self.window:
            m = m & (self.kpos[None, :n] > self.lens[:, None] - self.window)
        # additive (0 / -inf) rather than boolean: SDPA would convert a boolean mask again in every layer
        bias = torch.zeros(m.shape, dtype=self.dtype, device=self.dev).masked_fill_(~m, -math.inf)
        cache = RowKVCache(self.ks, self.vs, self.lens, n)
        logits = self.model(self.last[:, None], self.lens[:, None], bias[:, None, None, :], cache)[:, -1]
        idx = torch.tensor(live, device=self.dev)
        self.lens[idx] += 1
        return logits[idx]

    def _join(self, waiting: bool = True) -> tuple[list[int], Tensor | None]:
        """Requests prefilled elsewhere, then (with `waiting`) as many waiting ones as there are rows (and prefill
        budget) for, take free rows: -> their rows, logits."""
        free = [r for r, row in enumerate(self.rows) if row is None]
        room = len(free) + self.max_rows - len(self.rows)
        ready = self.prefilled[:room]
        # the first waiting requests; they leave `waiting` once prefilled (a failed prefill leaves them there, for
        # `reset` to name them)
        n = prefill_count(self.waiting, room - len(ready), self.max_prefill_tokens) if waiting else 0
        take = self.waiting[:n]
        parts = ready + (prefill(self.model, take) if take else [])
        if not parts:
            return [], None
        need = len(parts) - len(free)
        if need > 0:
            free += list(range(len(self.rows), len(self.rows) + need))
        rows = free[: len(parts)]
        self._grow(len(self.rows) + max(need, 0), max(p.k.shape[2] for p in parts))
        for r, p in zip(rows, parts):
            n = p.k.shape[2]
            for layer in range(len(self.ks)):
                self.ks[layer][r, :, :n] = p.k[layer]
                self.vs[layer][r, :, :n] = p.v[layer]
            self.lens[r] = n
            q = p.req
            self.rows[r] = _Row(q, min(q.params.max_new_tokens, self.context - n), frozenset(q.params.stop_ids))
        del self.prefilled[: len(ready)]
        del self.waiting[: len(take)]
        return rows, torch.stack([p.logits for p in parts])

    def _emit(self, rows: list[int], logits: Tensor) -> list[Token]:
        """Sample one token for each of `rows` from logits [len(rows), V]; finished rows leave."""
        logits = logits.float()
        reqs = [self.rows[r].req for r in rows]  # type: ignore[union-attr]
        temp = torch.tensor([q.params.temperature for q in reqs], device=self.dev)
        u = None
        if any(q.params.temperature > 0 for q in reqs):
            u = torch.tensor([self._uniform(r) for r in rows], device=self.dev)
        tok = sample_rows(logits, temp, torch.tensor([q.params.top_k for q in reqs], device=self.dev),
                          torch.tensor([q.params.top_p for q in reqs], device=self.dev), u)
        lps = top = None
        want = [q.params.logprobs or q.top_logprobs > 0 for q in reqs]
        if any(want):
            lsm = logits.log_softmax(-1)
            lps = lsm.gather(-1, tok[:, None])[:, 0].tolist()
            k = max(q.top_logprobs for q in reqs)
            if k > 0:
                v, i = lsm.topk(min(k, lsm.shape[-1]), dim=-1)
                top = list(zip(i.tolist(), v.tolist()))
        self.last[torch.tensor(rows, device=self.dev)] = tok
        out = []
        for j, (r, t) in enumerate(zip(rows, tok.tolist())):
            row = self.rows[r]
            assert row is not None
            row.generated += 1
            reason = "stop" if t in row.stops else "length" if row.generated >= row.max_new else None
            q = row.req
            out.append(Token(q.key, t, reason, lps[j] if lps is not None and want[j] else None,
                             list(zip(*top[j]))[: q.top_logprobs] if top is not None and q.top_logprobs else None))
            if reason is not None:
                self._free(r)
        return out

    def _uniform(self, r: int) -> float:
        """Row r's U(0, 1) draw for its next token (0.5 for a greedy row, which ignores it). A sampled row draws
        all of them from its own generator at its first token: one call per request, not one per token (and not V
        exponentials per token: 70 us a row at V = 4096)."""
        row = self.rows[r]
        assert row is not None
        if row.req.params.temperature <= 0:
            return 0.5
        if row.uniform is None:
            g = row.req.generator
            row.uniform = torch.rand(row.max_new, generator=g, device=g.device if g is not None else self.dev)
        return float(row.uniform[row.generated])

    def _free(self, r: int) -> None:
        self.rows[r] = None
        self.lens[r] = 0
        self.last[r] = 0

    def _grow(self, rows: int, slots: int) -> None:
        """Make the cache at least rows x slots. Rows within the buffers' room are a wider view (no copy); beyond
        it, or past their slots, new buffers (rows doubling up to max_rows, slots doubling up to the context) take a
        copy. A row that joins finds stale keys in its slots: masked (its own length is 0) and overwritten."""
        R, L = self.ks[0].shape[0], self.ks[0].shape[2]
        if rows <= R and slots <= L:
            return
        room = self.kb[0].shape[0]
        if rows > room or slots > L:
            newL = L if slots <= L else min(self.context, max(slots, 2 * L, 64))
            room = max(rows, min(self.max_rows, 2 * room))

            def grown(t: Tensor) -> Tensor:
                new = t.new_zeros(room, t.shape[1], newL, t.shape[3])
                new[:R, :, :L] = t[:R]
                return new

            self.kb, self.vb = [grown(t) for t in self.kb], [grown(t) for t in self.vb]
        newR = max(rows, R)
        self.ks, self.vs = [t[:newR] for t in self.kb], [t[:newR] for t in self.vb]
        if newR > R:
            self.lens = torch.cat([self.lens, self.lens.new_zeros(newR - R)])
            self.last = torch.cat([self.last, self.last.new_zeros(newR - R)])
            self.rows += [None] * (newR - R)

    def _compact(self) -> None:
        """Holes leave the cache: the running rows move to the front of the buffers (a copy of them); with none
        left the buffers go (an idle server holds no cache)."""
        keep = [r for r, row in enumerate(self.rows) if row is not None]
        idx = torch.tensor(keep, dtype=torch.long, device=self.dev)
        if not keep:
            self.kb = [t.new_zeros(0, t.shape[1], 0, t.shape[3]) for t in self.kb]
            self.vb = [t.new_zeros(0, t.shape[1], 0, t.shape[3]) for t in self.vb]
        for t in self.kb + self.vb:
            t[: len(keep)] = t[idx]
        self.ks, self.vs = [t[: len(keep)] for t in self.kb], [t[: len(keep)] for t in self.vb]
        self.lens, self.last = self.lens[idx], self.last[idx]
        self.rows = [self.rows[r] for r in keep]
