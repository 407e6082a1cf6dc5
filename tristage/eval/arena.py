"""Ratings from pairwise battles: Bradley-Terry with bootstrap intervals, style control, online Elo, the matrices.

    battles = read_battles("battles.jsonl")            # Chatbot Arena's shape: model_a, model_b, winner
    board = leaderboard(battles, bootstrap=1000, seed=0, anchor=("gpt35", 1000.0), style=None)
    board.rows()                                        # [{model, rating, lower, upper, battles, ...}] best first
    online_elo(battles); battle_counts(battles); win_fractions(battles); predicted_win_rates(board.rating)

Pure functions over numpy arrays (no torch: `tristage leaderboard` starts in a fraction of a second).

The model (Bradley-Terry, as the Chatbot Arena fits it; FastChat's `compute_mle_elo`):
    P(model_a beats model_b) = 1 / (1 + 10 ** ((R_b - R_a) / 400)) = sigmoid(ALPHA * (R_a - R_b)), ALPHA = ln 10 / 400
on the familiar scale: base 10, 400 points (a 400-point gap is 10:1 odds), the mean rating 1000, or with an
anchor one model at a set rating (the whole board shifted; FastChat anchors every bootstrap round the same way,
so the anchor's own interval has no width). A battle's outcome s is 1 (model_a won), 0 (model_b won) or 1/2 (a
tie, "tie" or "tie (bothbad)"): a tie counts half a win each way, which is FastChat's duplication of the battles
with a tie as one A win and one B win, up to a factor 2 on the log-likelihood.

Choices, and why:
- Solver: Newton's method with a backtracking line search on the exact log-likelihood (the Hessian is p x p for p
  models, plus the style covariates), to 1e-10 in log-odds. Without style control the battles are first counted
  into (model_a, model_b, outcome) cells, with each battle's sides put in one canonical order (a battle with its
  sides and its winner swapped is the same battle), so a fit costs the same for 10^3 or 10^6 battles.
- The prior: a Gaussian prior on the ratings, sd `prior_sd` = 1000 rating points by default (lambda/2 |theta|^2 on
  the natural log-odds scale, lambda = 1 / (prior_sd * ALPHA)^2 = 0.030): about 0.12 virtual ties per model
  against an average opponent, which moves ratings backed by hundreds of battles by hundredths of a point but keeps
  a model that never lost (or never won) finite; the mean rating is pinned at 1000 by an extra penalty on the mean
  that the likelihood does not see. A model that never lost has upper bound +inf (and one that never won lower
  bound -inf): its rating is then the prior's doing, and the board says so.
- Bootstrap intervals resample the battles with replacement (seeded, `numpy.random.default_rng(seed)`), refit,
  and report the median and the 2.5 / 97.5 percentiles per model. Without style control a resample is a
  multinomial draw of counts over the cells above (the same distribution as resampling battles one by one, and
  what FastChat's current code does), fitted in one batched Newton over all rounds, so the intervals do not
  depend on the order of the battles in the file either. A model absent from a resample has no rating in it.
- Rank (FastChat's `final_ranking`): 1 + the number of models whose lower bound is above this model's upper
  bound; models whose intervals overlap share a rank.
- Style control (the current public arena's method): covariates are fitted jointly with the ratings,
      P(A beats B) = sigmoid(ALPHA * (R_a - R_b) + sum_f beta_f * z_f),
  where z_f is the difference of feature f between the two answers: for features that are never negative
  (lengths, counts) the normalised difference (f_a - f_b) / (f_a + f_b + 1), as FastChat does, otherwise the plain
  difference; each covariate is divided by its root mean square over the battles. It is not centred (FastChat
  centres it): a battle with its sides swapped must stay the same battle, and centring would tie the fit to the
  side each answer happened to be shown on. A covariate that is zero in every battle is dropped (and the board
  says so). The ratings are then what a model earns at equal style; beta_f (reported in rating points per rms of
  the covariate, with its bootstrap interval) is what style buys. The covariates get the same Gaussian prior.
- Features: `style_a` / `style_b` objects of numbers on a battle record (the arena writes length, headers, lists
  and bold: `style_features`), or the public Chatbot Arena files' `conv_metadata` (sum_assistant_X_tokens ->
  length, header_count_X -> headers, list_count_X -> lists, bold_count_X -> bold). A feature is usable when every
  battle has it.
- Online Elo (`online_elo`, for comparison; K = 4 as in FastChat): one pass over the battles in file order, so it
  depends on that order, which the Bradley-Terry fit does not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tristage.io import DataError, UserError, json_object, parse_json, read_lines

WINNERS = ("model_a", "model_b", "tie", "tie (bothbad)")
SCALE, BASE, INIT_RATING = 400.0, 10.0, 1000.0
ALPHA = math.log(BASE) / SCALE  # natural log-odds per rating point
PRIOR_SD = 1000.0  # rating points: the default Gaussian prior on the ratings (see the module docstring)
MAX_ROWS = 4_000_000  # rounds x rows per batched Newton chunk (bounds the memory of a style-control bootstrap)
CONV_METADATA = {"length": "sum_assistant_{}_tokens", "headers": "header_count_{}", "lists": "list_count_{}",
                 "bold": "bold_count_{}"}


# ----------------------------------------------------------------------------- battles
@dataclass
class Battles:
    """N battles between p models. models [p] sorted by name; a, b [N] int64 indices of model_a and model_b;
    score [N] float64 (1 model_a won, 0 model_b won, 0.5 a tie); style_a, style_b: feature -> [N] float64 values of
    each side's answer (only features every battle has)."""

    models: list[str]
    a: np.ndarray
    b: np.ndarray
    score: np.ndarray
    style_a: dict[str, np.ndarray] = field(default_factory=dict)
    style_b: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.score)

    @classmethod
    def from_lists(cls, model_a: Sequence[str], model_b: Sequence[str], winner: Sequence[str],
                   style_a: Sequence[dict[str, float]] | None = None,
                   style_b: Sequence[dict[str, float]] | None = None) -> Battles:
        """From parallel lists (winner in WINNERS; style dicts per battle, optional)."""
        models = sorted(set(model_a) | set(model_b))
        idx = {m: i for i, m in enumerate(models)}
        score = np.array([_SCORES[w] for w in winner], dtype=np.float64)
        feats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if style_a is not None and style_b is not None and len(style_a):
            common = set.intersection(*(set(x) & set(y) for x, y in zip(style_a, style_b)))
            for f in sorted(common):
                feats[f] = (np.array([float(x[f]) for x in style_a]), np.array([float(y[f]) for y in style_b]))
        return cls(models, np.array([idx[m] for m in model_a], dtype=np.int64),
                   np.array([idx[m] for m in model_b], dtype=np.int64), score,
                   {f: v[0] for f, v in feats.items()}, {f: v[1] for f, v in feats.items()})

    @property
    def features(self) -> list[str]:
        return sorted(self.style_a)

    def winners(self) -> list[str]:
        return ["model_a" if s == 1 else "model_b" if s == 0 else "tie" for s in self.score.tolist()]

    def select(self, keep: np.ndarray) -> Battles:
        """The battles where `keep` [N] bool is true (models with no battle left are dropped)."""
        used = sorted(set(self.a[keep].tolist()) | set(self.b[keep].tolist()))
        remap = np.full(len(self.models), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        return Battles([self.models[i] for i in used], remap[self.a[keep]], remap[self.b[keep]], self.score[keep],
                       {f: v[keep] for f, v in self.style_a.items()}, {f: v[keep] for f, v in self.style_b.items()})

    def among(self, models: Iterable[str]) -> Battles:
        """Only the battles between the named models."""
        names = set(models)
        ok = np.array([m in names for m in self.models], dtype=bool)
        return self.select(ok[self.a] & ok[self.b])

    def swapped(self, mask: np.ndarray) -> Battles:
        """The same battles with the sides of those where `mask` [N] bool is true swapped (winner swapped too)."""
        a, b = np.where(mask, self.b, self.a), np.where(mask, self.a, self.b)
        sa = {f: np.where(mask, self.style_b[f], v) for f, v in self.style_a.items()}
        sb = {f: np.where(mask, self.style_a[f], v) for f, v in self.style_b.items()}
        return Battles(list(self.models), a, b, np.where(mask, 1.0 - self.score, self.score), sa, sb)


_SCORES = {"model_a": 1.0, "model_b": 0.0, "tie": 0.5, "tie (bothbad)": 0.5}


def _number(v: Any, where: str) -> float:
    if isinstance(v, dict):  # FastChat's per-kind counts ({"h1": 2, "h2": 0}, {"ordered": 1, "unordered": 3})
        return sum(_number(x, where) for x in v.values())
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise DataError(None, None, f"expected a finite number, got {v!r:.60}", where)
    return float(v)


def _style(obj: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """(style_a, style_b) of a battle record: its style_a / style_b objects, or its conv_metadata."""
    if "style_a" in obj or "style_b" in obj:
        out = []
        for side in ("style_a", "style_b"):
            s = obj.get(side)
            if not isinstance(s, dict):
                raise DataError(None, None, f"expected an object of numbers, got {type(s).__name__}", side)
            out.append({str(k): _number(v, f"{side}.{k}") for k, v in s.items()})
        if set(out[0]) != set(out[1]):
            raise DataError(None, None, f"style_a has {sorted(out[0])} but style_b has {sorted(out[1])}", "style_b")
        return out[0], out[1]
    meta = obj.get("conv_metadata")
    if isinstance(meta, dict):
        sides: tuple[dict[str, float], dict[str, float]] = ({}, {})
        for name, key in CONV_METADATA.items():
            ka, kb = key.format("a"), key.format("b")
            if ka in meta and kb in meta:
                sides[0][name] = _number(meta[ka], f"conv_metadata.{ka}")
                sides[1][name] = _number(meta[kb], f"conv_metadata.{kb}")
        return sides
    return {}, {}


def parse_battle(obj: dict[str, Any]) -> tuple[str, str, str, dict[str, float], dict[str, float]]:
    """(model_a, model_b, winner, style_a, style_b) of one record; an unlocated DataError naming the field."""
    names = []
    for key in ("model_a", "model_b"):
        v = obj.get(key)
        if not isinstance(v, str) or not v.strip():
            raise DataError(None, None, f"expected a model name (a non-empty string), got {v!r:.60}", key)
        names.append(v)
    if names[0] == names[1]:
        raise DataError(None, None, f"model_a and model_b are the same model ({names[0]!r})", "model_b")
    w = obj.get("winner")
    if w not in _SCORES:
        raise DataError(None, None, f"expected one of {', '.join(WINNERS)}; got {w!r:.60}", "winner")
    sa, sb = _style(obj)
    return names[0], names[1], w, sa, sb


def battle_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, object) per JSONL line, or (1-based position, object) per element of a JSON list (the public Chatbot
    Arena files are JSON lists); every reading problem is a DataError naming the file (and line)."""
    lines = read_lines(path)
    n = 0
    for i, line in lines:
        if not line.strip():
            continue
        if n == 0 and line.lstrip().startswith("["):
            try:
                data = parse_json(line + "".join(rest for _, rest in lines))
            except DataError as e:
                raise e.at(path, i + (e.line or 1) - 1) from None
            if not isinstance(data, list):
                raise DataError(path, i, "expected a JSON list of battle objects")
            for j, obj in enumerate(data, 1):
                if not isinstance(obj, dict):
                    raise DataError(path, j, f"expected a JSON object, got {type(obj).__name__}")
                n += 1
                yield j, obj
            break
        n += 1
        yield i, json_object(line, path, i)
    if not n:
        raise DataError(path, None, "no battles (the file is empty)")


def read_battles(path: str | Path) -> Battles:
    """Battles of a JSONL file (or JSON list) of {model_a, model_b, winner} records (plus optional style_a /
    style_b, or conv_metadata); a bad record raises DataError at file:line naming the field."""
    ma, mb, win, sa, sb = [], [], [], [], []
    for line, obj in battle_records(path):
        try:
            a, b, w, x, y = parse_battle(obj)
        except DataError as e:
            raise e.at(path, line) from None
        ma.append(a), mb.append(b), win.append(w), sa.append(x), sb.append(y)
    return Battles.from_lists(ma, mb, win, sa, sb)


# ----------------------------------------------------------------------------- style features of an answer
_HEADER = re.compile(r"^#{1,6}\s", re.M)
_LIST = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s", re.M)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")


def style_features(text: str) -> dict[str, float]:
    """What the arena records of each answer for style control: length (characters), and as FastChat counts
    markdown, headers (lines starting with #), lists (list-item lines) and bold (**x** or __x__ spans)."""
    return {"length": float(len(text)), "headers": float(len(_HEADER.findall(text))),
            "lists": float(len(_LIST.findall(text))), "bold": float(len(_BOLD.findall(text)))}


def style_covariates(b: Battles, features: Sequence[str]) -> tuple[np.ndarray, list[str], list[str]]:
    """(Z [N, k], the features used, the features dropped as zero in every battle): per feature the normalised
    difference (f_a - f_b) / (f_a + f_b + 1) when no value is negative, else f_a - f_b, divided by its root mean
    square over the battles."""
    cols, used, dropped = [], [], []
    for f in features:
        if f not in b.style_a:
            have = ", ".join(b.features) or "none"
            raise UserError(f"style feature {f!r} is not on every battle (features every battle has: {have})")
        x, y = b.style_a[f], b.style_b[f]
        d = (x - y) / (x + y + 1.0) if min(x.min(), y.min()) >= 0 else x - y
        rms = float(np.sqrt(np.mean(d * d))) if len(d) else 0.0
        if rms == 0.0:
            dropped.append(f)
            continue
        cols.append(d / rms)
        used.append(f)
    z = np.stack(cols, 1) if cols else np.zeros((len(b), 0))
    return z, used, dropped


# ----------------------------------------------------------------------------- the fit
def _expit(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _objective(x: np.ndarray, a: np.ndarray, b: np.ndarray, s: np.ndarray, w: np.ndarray, z: np.ndarray, p: int,
               lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(negative log-posterior [R], logits [R, n]) at parameters x [R, p + k]."""
    logits = x[:, a] - x[:, b] + x[:, p:] @ z.T
    nll = (w * (np.logaddexp(0.0, logits) - s * logits)).sum(1)
    th = x[:, :p]
    return nll + 0.5 * lam * (x * x).sum(1) + 0.5 * th.sum(1) ** 2 / p, logits


def _newton(a: np.ndarray, b: np.ndarray, s: np.ndarray, w: np.ndarray, z: np.ndarray, p: int, lam: float,
            x0: np.ndarray | None = None, tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """Minimise sum_i w_ri [softplus(l_ri) - s_i l_ri] + lam/2 |x_r|^2 + (sum theta_r)^2 / (2p), l_ri = theta_r[a_i] -
    theta_r[b_i] + z_i . beta_r, for each round r at once. a, b [n] model indices; s [n] outcomes in [0, 1]; w [R, n]
    weights; z [n, k] covariates. Returns x [R, p + k] = (theta: natural log-odds, beta)."""
    R, n = w.shape
    k = z.shape[1]
    d = p + k
    x = np.zeros((R, d)) if x0 is None else np.array(x0, dtype=np.float64)
    rows = np.arange(R)[:, None]
    ia, ib = (rows * p + a).ravel(), (rows * p + b).ravel()
    cell = (rows * p * p + a * p + b).ravel()
    eye = np.eye(d)
    ones = np.zeros(d)
    ones[:p] = 1.0
    active = np.ones(R, dtype=bool)
    loss, logits = _objective(x, a, b, s, w, z, p, lam)
    for _ in range(max_iter):
        q = _expit(logits)
        r = w * (q - s)
        v = w * q * (1.0 - q)
        g = np.zeros((R, d))
        g[:, :p] = (np.bincount(ia, r.ravel(), R * p) - np.bincount(ib, r.ravel(), R * p)).reshape(R, p)
        g[:, p:] = r @ z
        g += lam * x + x[:, :p].sum(1, keepdims=True) * ones / p
        c = np.bincount(cell, v.ravel(), R * p * p).reshape(R, p, p)
        c = c + c.transpose(0, 2, 1)
        h = np.zeros((R, d, d))
        h[:, :p, :p] = -c
        h[:, np.arange(p), np.arange(p)] += c.sum(2)
        for j in range(k):
            vz = (v * z[:, j]).ravel()
            col = (np.bincount(ia, vz, R * p) - np.bincount(ib, vz, R * p)).reshape(R, p)
            h[:, :p, p + j] = col
            h[:, p + j, :p] = col
        if k:
            h[:, p:, p:] = np.einsum("rn,nj,nl->rjl", v, z, z)
        h += lam * eye + np.outer(ones, ones) / p
        step = np.linalg.solve(h, g[..., None])[..., 0]
        step[~active] = 0.0
        # backtracking (Armijo) per round: a full Newton step, halved until the objective falls enough
        t = np.ones(R)
        slope = -(g * step).sum(1)
        todo = active.copy()
        new_x, new_loss, new_logits = x.copy(), loss.copy(), logits.copy()
        for _ in range(60):
            cand = x - t[:, None] * step
            cl, cg = _objective(cand[todo], a, b, s, w[todo], z, p, lam)
            ok = cl <= loss[todo] + 1e-4 * t[todo] * slope[todo] + 1e-12 * np.abs(loss[todo])
            idx = np.flatnonzero(todo)
            good = idx[ok]
            new_x[good], new_loss[good], new_logits[good] = cand[good], cl[ok], cg[ok]
            todo[good] = False
            if not todo.any():
                break
            t[todo] *= 0.5
        x, loss, logits = new_x, new_loss, new_logits
        moved = np.abs(t[:, None] * step).max(1)
        active &= moved > tol
        if not active.any():
            break
    return x


def _cells(b: Battles) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The battles counted into cells (a, b, s) with sides in canonical order (a < b): a, b, s, counts [C]."""
    p = len(b.models)
    swap = b.a > b.b
    lo, hi = np.where(swap, b.b, b.a), np.where(swap, b.a, b.b)
    s = np.where(swap, 1.0 - b.score, b.score)
    key = (lo * p + hi) * 3 + np.rint(2 * s).astype(np.int64)
    keys, counts = np.unique(key, return_counts=True)
    pair, out = keys // 3, keys % 3
    return pair // p, pair % p, out / 2.0, counts.astype(np.float64)


def _components(p: int, a: np.ndarray, b: np.ndarray) -> list[list[int]]:
    """Groups of models linked by battles (union-find)."""
    parent = list(range(p))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for x, y in set(zip(a.tolist(), b.tolist())):
        parent[find(x)] = find(y)
    groups: dict[int, list[int]] = {}
    for i in range(p):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values(), key=lambda g: (-len(g), g))


def prior_lambda(prior_sd: float) -> float:
    """The Gaussian prior's precision on the natural log-odds scale for an sd of `prior_sd` rating points."""
    return 1.0 / (prior_sd * ALPHA) ** 2


def fit_bt(b: Battles, style: Sequence[str] = (), prior_sd: float = PRIOR_SD) -> tuple[np.ndarray, np.ndarray]:
    """Bradley-Terry ratings [p] (mean 1000, base 10, scale 400) and, with style covariates, their coefficients [k]
    (rating points per rms of each covariate; style_covariates says which features survive)."""
    ratings, coef, _ = _fit(b, style, prior_sd, rounds=0, seed=0)
    return ratings[0], coef[0]


def _fit(b: Battles, style: Sequence[str], prior_sd: float, rounds: int,
         seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Ratings [1 + rounds, p] and style coefficients [1 + rounds, k] (rating points; row 0 the fit on all battles,
    then one row per bootstrap resample, NaN for a model absent from it), and the style features used."""
    p, lam = len(b.models), prior_lambda(prior_sd)
    rng = np.random.default_rng(seed)
    if style:
        z, used, _ = style_covariates(b, style)
        a, bb, s = b.a, b.b, b.score
        n = len(b)
        base = np.ones((1, n))
        draw = (lambda m: rng.multinomial(n, np.full(n, 1.0 / n), size=m).astype(np.float64))
    else:
        used = []
        a, bb, s, counts = _cells(b)
        z = np.zeros((len(s), 0))
        base = counts[None, :]
        draw = (lambda m: rng.multinomial(len(b), counts / counts.sum(), size=m).astype(np.float64))
    x_full = _newton(a, bb, s, base, z, p, lam)
    xs = [x_full]
    chunk = max(1, MAX_ROWS // max(1, len(s)))
    done = 0
    while done < rounds:
        m = min(chunk, rounds - done)
        w = draw(m)
        x = _newton(a, bb, s, w, z, p, lam, x0=np.repeat(x_full, m, 0))
        rows = np.arange(m)[:, None] * p
        present = (np.bincount((rows + a).ravel(), w.ravel(), m * p)
                   + np.bincount((rows + bb).ravel(), w.ravel(), m * p)).reshape(m, p)
        x[:, :p][present == 0] = np.nan
        xs.append(x)
        done += m
    x = np.concatenate(xs, 0)
    return INIT_RATING + x[:, :p] / ALPHA, x[:, p:] / ALPHA, used


# ----------------------------------------------------------------------------- the board
@dataclass
class Leaderboard:
    """A fitted board, models best first. Arrays are [p] in `models` order; style arrays [k] in `style` order."""

    models: list[str]
    rating: np.ndarray  # the Bradley-Terry fit on all battles
    median: np.ndarray  # bootstrap median, 2.5 and 97.5 percentiles (NaN without a bootstrap; +-inf, see below)
    lower: np.ndarray
    upper: np.ndarray
    rank: np.ndarray  # 1 + models whose lower bound is above this one's upper bound
    battles: np.ndarray
    wins: np.ndarray
    losses: np.ndarray
    ties: np.ndarray
    online_elo: np.ndarray
    style: list[str]  # covariates fitted jointly (empty: style control off)
    style_coef: np.ndarray  # rating points per rms of each covariate
    style_lower: np.ndarray
    style_upper: np.ndarray
    bootstrap: int
    seed: int
    anchor: tuple[str, float] | None
    prior_sd: float
    notes: list[str]  # plain-words caveats: undefeated models, disconnected groups, dropped covariates
    samples: np.ndarray  # [bootstrap, p] the resampled ratings

    @property
    def style_control(self) -> bool:
        return bool(self.style)

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-ready object per model, best first: rank, model, rating, lower, upper (null where unbounded or
        without a bootstrap), median, battles, wins, losses, ties, online_elo, style_control (the covariates)."""
        def num(x: float) -> float | None:
            return None if not math.isfinite(x) else round(float(x), 2)

        return [{"rank": int(self.rank[i]), "model": m, "rating": num(self.rating[i]), "lower": num(self.lower[i]),
                 "upper": num(self.upper[i]), "median": num(self.median[i]), "battles": int(self.battles[i]),
                 "wins": int(self.wins[i]), "losses": int(self.losses[i]), "ties": int(self.ties[i]),
                 "online_elo": num(self.online_elo[i]), "style_control": list(self.style)}
                for i, m in enumerate(self.models)]


def parse_anchor(spec: str) -> tuple[str, float]:
    """`MODEL=RATING` -> (model, rating); a UserError naming --anchor otherwise."""
    model, sep, value = spec.rpartition("=")
    try:
        rating = float(value)
    except ValueError:
        rating = math.nan
    if not sep or not model or not math.isfinite(rating):
        raise UserError(f"--anchor must be MODEL=RATING with a finite number (got {spec!r})")
    return model, rating


def leaderboard(b: Battles, *, bootstrap: int = 1000, seed: int = 0, anchor: tuple[str, float] | None = None,
                style: Sequence[str] | None = None, prior_sd: float = PRIOR_SD) -> Leaderboard:
    """The board of battles `b`: Bradley-Terry ratings with `bootstrap` resamples (seeded), ranks, counts, online
    Elo, and with `style` (a list of features; empty = every feature the battles carry) style control."""
    if len(b) == 0:
        raise UserError("no battles to rate")
    if bootstrap < 0:
        raise UserError(f"--bootstrap must be >= 0 (got {bootstrap})")
    if not (prior_sd > 0 and math.isfinite(prior_sd)):
        raise UserError(f"--prior-sd must be a finite number > 0 (got {prior_sd})")
    if anchor is not None and anchor[0] not in b.models:
        raise UserError(f"--anchor {anchor[0]}: no such model in the battles (models: {', '.join(b.models)})")
    notes: list[str] = []
    feats: list[str] = []
    if style is not None:
        feats = list(style) or b.features
        if not feats:
            raise UserError("--style-control: the battles carry no style features (style_a / style_b objects of "
                            "numbers, or conv_metadata, on every battle)")
        _, used, dropped = style_covariates(b, feats)
        if dropped:
            notes.append(f"style feature(s) {', '.join(dropped)} equal on both sides of every battle: not fitted")
        if not used:
            raise UserError(f"--style-control: no style feature varies between the two sides ({', '.join(feats)})")
        feats = used
    ratings, coef, used = _fit(b, feats, prior_sd, bootstrap, seed)
    if anchor is not None:
        ratings = ratings + (anchor[1] - ratings[:, [b.models.index(anchor[0])]])
    p = len(b.models)
    full, samples = ratings[0], ratings[1:]
    won = np.bincount(b.a, b.score, p) + np.bincount(b.b, 1.0 - b.score, p)
    lost = np.bincount(b.a, 1.0 - b.score, p) + np.bincount(b.b, b.score, p)
    tie = b.score == 0.5
    n_battles = np.bincount(b.a, minlength=p) + np.bincount(b.b, minlength=p)
    n_ties = np.bincount(b.a[tie], minlength=p) + np.bincount(b.b[tie], minlength=p)
    n_wins = np.bincount(b.a[b.score == 1], minlength=p) + np.bincount(b.b[b.score == 0], minlength=p)
    if bootstrap:
        with np.errstate(all="ignore"):
            lo, med, hi = np.nanpercentile(samples, [2.5, 50, 97.5], axis=0)
            slo, shi = (np.nanpercentile(coef[1:], [2.5, 97.5], axis=0) if used
                        else (np.zeros(0), np.zeros(0)))
    else:
        lo = med = hi = np.full(p, np.nan)
        slo = shi = np.full(len(used), np.nan)
    hi = np.where(lost == 0, np.inf, hi)
    lo = np.where(won == 0, -np.inf, lo)
    for i in np.flatnonzero(lost == 0):
        notes.append(f"{b.models[i]} never lost (wins {n_wins[i]}, ties 0): its rating is set by the prior "
                     f"(sd {prior_sd:g} points), it has no upper bound")
    for i in np.flatnonzero(won == 0):
        notes.append(f"{b.models[i]} never won (nor tied): its rating is set by the prior, it has no lower bound")
    groups = _components(p, b.a, b.b)
    if len(groups) > 1:
        names = "; ".join(", ".join(b.models[i] for i in g) for g in groups)
        notes.append(f"the battles form {len(groups)} groups never compared with each other ({names}): ratings "
                     "are comparable only within a group")
    elo = online_elo(b)
    order = sorted(range(p), key=lambda i: (-full[i], b.models[i]))
    upper_cmp = np.where(np.isnan(hi), full, hi)
    lower_cmp = np.where(np.isnan(lo), full, lo)
    rank = np.array([1 + sum(lower_cmp[j] > upper_cmp[i] for j in range(p) if j != i) for i in range(p)])
    o = np.array(order, dtype=np.int64)
    return Leaderboard([b.models[i] for i in order], full[o], med[o], lo[o], hi[o], rank[o], n_battles[o],
                       n_wins[o], (n_battles - n_wins - n_ties)[o], n_ties[o], elo[o], used, coef[0], slo, shi,
                       bootstrap, seed, anchor, prior_sd, notes, samples[:, o])


# ----------------------------------------------------------------------------- comparisons
def online_elo(b: Battles, k: float = 4.0, init: float = INIT_RATING) -> np.ndarray:
    """Online Elo ratings [p]: one pass over the battles in their order, R += K (S - E) for both sides."""
    r = np.full(len(b.models), init)
    for x, y, s in zip(b.a.tolist(), b.b.tolist(), b.score.tolist()):
        e = 1.0 / (1.0 + BASE ** ((r[y] - r[x]) / SCALE))
        r[x] += k * (s - e)
        r[y] -= k * (s - e)
    return r


def battle_counts(b: Battles) -> np.ndarray:
    """Battles between each two models [p, p] (symmetric, ties included)."""
    p = len(b.models)
    c = np.bincount(b.a * p + b.b, minlength=p * p).reshape(p, p)
    return c + c.T


def win_fractions(b: Battles) -> np.ndarray:
    """Share [p, p] of the decisive battles between row and column that the row model won (ties left out, as
    FastChat's pairwise win fraction); NaN where two models had no decisive battle, and on the diagonal."""
    p = len(b.models)
    won = np.zeros((p, p))
    np.add.at(won, (b.a[b.score == 1], b.b[b.score == 1]), 1.0)
    np.add.at(won, (b.b[b.score == 0], b.a[b.score == 0]), 1.0)
    total = won + won.T
    with np.errstate(invalid="ignore", divide="ignore"):
        out = won / total
    out[total == 0] = np.nan
    np.fill_diagonal(out, np.nan)
    return out


def predicted_win_rates(ratings: Sequence[float] | np.ndarray) -> np.ndarray:
    """P(row beats column) [p, p] under Bradley-Terry from ratings [p]; NaN on the diagonal."""
    r = np.asarray(ratings, dtype=np.float64)
    out = 1.0 / (1.0 + BASE ** ((r[None, :] - r[:, None]) / SCALE))
    np.fill_diagonal(out, np.nan)
    return out


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b between two orderings of the same items (ties handled; NaN when either is constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    i, j = np.triu_indices(len(x), 1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    n1, n2 = (dx != 0).sum(), (dy != 0).sum()
    if n1 == 0 or n2 == 0:
        return math.nan
    return float((dx * dy).sum() / math.sqrt(n1 * n2))
