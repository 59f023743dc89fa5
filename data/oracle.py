"""Bayes-optimal metrics for a synthetic log: how well any model could do on the held-out day.

For each held-out-day query (the split of data/split.py: users with an event on day D and >= min_history
events before it; target = their first event on D) the generator's next-event distribution is known given
the user's full history (data/synth.py):

    P(j) = p_pop * w_j / sum_{active i} w_i * [j active on D]
         + p_tr  * #{k : successor_k(prev) = j} / neighbours
         + p_rep * [j = item of the event lag_u events before the target]

with the mixture weights renormalised as in the generator. The oracle ranks all items by P (the Bayes
decision for every metric here) and reports two things:

  realised   HR@k, NDCG@k, MRR of the true target under that ranking, averaged over queries: the same
             protocol and queries as a model's evaluation (no seen-item exclusion), so a model's score
             divided by this one is its fraction of the best achievable. Ties count in the target's
             favour (rank = 1 + #items with strictly larger P).
  expected   E[HR@k] = sum of the top-k probabilities and E[NDCG@k] = sum_r P_(r) / log2(r + 1), averaged
             over queries: the same bound without the sampling noise of the realised targets.

The oracle sees the user's whole history and lag, which a model with a window of L events does not: it is
an upper bound, reached only by a model that has learnt the process and looks back at least lag_max events.
"""

import datetime as dt
import os
import tempfile
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data.schema import PathLike, require_day
from data.sequences import build_sequences, list_parts, sequence_files
from data.split import eval_rows, resolve_eval_day
from data.synth import GeneratorIds, Process, load_meta


def _probabilities(proc: Process, j: np.ndarray, z: np.ndarray, n_active: int, succ: np.ndarray,
                   rep: np.ndarray, mix: tuple) -> np.ndarray:
    """P(j) for item ids j of shape (Q, m); succ (Q, w); rep (Q,) (0 = no repeat component)."""
    p_pop, p_tr, p_rep = (m[:, None] for m in mix)
    active = (j >= 1) & (j <= n_active)
    pop = np.where(active, proc.weight[np.clip(j, 0, len(proc.weight) - 1)], 0.0) / z[:, None]
    trans = (succ[:, None, :] == j[:, :, None]).sum(-1) / succ.shape[1]
    repeat = (j == rep[:, None]) & (rep[:, None] > 0)
    return p_pop * pop + p_tr * trans + p_rep * repeat


def _query_arrays(proc: Process, q: pa.Table):
    user = q.column("user_id").to_numpy()
    e = q.column("n_history").to_numpy()  # index of the target event in the user's sequence
    off, hist = list_parts(q.column("history"))
    lag = proc.lag(user)
    prev = hist[off[1:] - 1]  # min_history >= 1, so every history has a last item
    has_rep = e >= lag
    # history holds the last lag_max >= lag events, so the event `lag` before the target is in it
    rep = np.where(has_rep, hist[np.where(has_rep, off[1:] - lag, off[1:] - 1)], 0)
    succ = proc.successors(prev[:, None], np.arange(proc.cfg.neighbours)[None, :])  # (Q, w)
    return e, lag, rep, succ


def _dedupe(ids: np.ndarray) -> np.ndarray:
    """Mask (Q, m): True at the first occurrence of each id in its row."""
    order = np.argsort(ids, axis=1, kind="stable")
    s = np.take_along_axis(ids, order, 1)
    first_sorted = np.ones_like(s, bool)
    first_sorted[:, 1:] = s[:, 1:] != s[:, :-1]
    mask = np.zeros_like(first_sorted)
    np.put_along_axis(mask, order, first_sorted, 1)
    return mask


def _score(proc: Process, q: pa.Table, n: int, sorted_w: np.ndarray, top_pop: np.ndarray, ks: Sequence[int],
           sums: dict) -> None:
    """Add the query batch's metric sums; n active items, sorted_w their weights ascending, top_pop the top ids."""
    z = np.full(q.num_rows, proc.cum[n])
    e, lag, rep, succ = _query_arrays(proc, q)
    mix = proc.mixture(e, lag)
    target = q.column("target").to_numpy()
    # Realised rank: 1 + non-candidates above the target (a search in the sorted active weights)
    # + candidates (successors, repeat item) above it.
    p_t = _probabilities(proc, target[:, None], z, n, succ, rep, mix)[:, 0]
    cand = np.concatenate([succ, rep[:, None]], axis=1)  # (Q, w+1)
    p_c = _probabilities(proc, cand, z, n, succ, rep, mix)
    valid = _dedupe(cand) & (cand != target[:, None]) & (cand >= 1) & (cand <= n)
    # A non-candidate j beats the target iff w_j > thr. For a non-candidate target thr is its own weight,
    # taken exactly: p_t * z / p_pop can round just below it and count the target above itself.
    is_cand = (cand == target[:, None]).any(1)
    w_t = np.where((target >= 1) & (target <= n), proc.weight[np.clip(target, 0, len(proc.weight) - 1)], 0.0)
    thr = np.where(is_cand, p_t * z / mix[0], w_t)
    pop_above = n - np.searchsorted(sorted_w, thr, side="right")
    cand_in_pop = valid & (proc.weight[np.clip(cand, 0, None)] > thr[:, None])
    rank = 1 + pop_above - cand_in_pop.sum(1) + (valid & (p_c > p_t[:, None])).sum(1)
    # Expected metrics: the top max(ks) items lie among the top (max(ks) + w + 1) popular items and the candidates.
    kmax = max(ks)
    pool = np.concatenate([np.broadcast_to(top_pop, (q.num_rows, len(top_pop))), cand], axis=1)
    p_pool = np.where(_dedupe(pool) & (pool >= 1), _probabilities(proc, pool, z, n, succ, rep, mix), 0.0)
    p_sorted = -np.sort(-p_pool, axis=1)[:, :kmax]  # (Q, kmax) descending
    disc = 1.0 / np.log2(np.arange(2, kmax + 2))
    sums["queries"] += q.num_rows
    sums["mrr"] += float((1.0 / rank).sum())
    for k in ks:
        hit = rank <= k
        sums[f"hr@{k}"] += float(hit.sum())
        sums[f"ndcg@{k}"] += float((hit / np.log2(rank + 1)).sum())
        sums[f"expected_hr@{k}"] += float(p_sorted[:, :k].sum())
        sums[f"expected_ndcg@{k}"] += float((p_sorted[:, :k] * disc[:k]).sum())


def _top_active_ids(proc: Process, n: int, m: int) -> np.ndarray:
    m = min(m, n)
    top = np.argpartition(-proc.weight[1 : n + 1], m - 1)[:m] + 1
    return top[np.argsort(-proc.weight[top], kind="stable")]


def oracle_metrics(
    log_dir: PathLike,
    eval_day: Optional[str] = None,
    ks: Sequence[int] = (1, 5, 10, 20, 50, 100),
    *,
    min_history: int = 1,
    backend: str = "ray",
    seq_dir: Optional[PathLike] = None,
    work_dir: Optional[PathLike] = None,
) -> dict:
    """Bayes-optimal realised and expected HR@k / NDCG@k (and realised MRR) on the held-out day's queries.

    `seq_dir`: sequences already built through the eval day in the generator's ids (prepare_held_out's
    work_dir/sequences of a dense log); otherwise they are built with `backend` into a temporary directory
    under `work_dir`. Out-of-vocabulary targets are not a miss here: the oracle knows every item.
    """
    cfg, _ = load_meta(log_dir)
    proc = Process.from_config(cfg)
    day = resolve_eval_day(log_dir, eval_day)
    require_day(log_dir, day)
    day_index = (day - dt.date.fromisoformat(cfg.start_day)).days
    if not 0 <= day_index < cfg.days:
        raise ValueError(f"eval day {day} is outside the generated days of {log_dir}")
    sums: dict = {"queries": 0, "mrr": 0.0}
    for k in ks:
        for name in ("hr", "ndcg", "expected_hr", "expected_ndcg"):
            sums[f"{name}@{k}"] = 0.0
    n = int(proc.n_active[day_index])
    sorted_w = np.sort(proc.weight[1 : n + 1])
    top_pop = _top_active_ids(proc, n, max(ks) + cfg.neighbours + 1)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        if seq_dir is None:  # raw ids are read back as the generator's own
            seq_dir = os.path.join(tmp, "sequences")
            ids = GeneratorIds(cfg.raw_ids) if cfg.raw_ids != "dense" else None
            build_sequences(log_dir, seq_dir, day + dt.timedelta(days=1), backend, ids=ids)  # type: ignore[arg-type]
        for path in sequence_files(seq_dir):
            q = eval_rows(pq.read_table(path), day, cfg.lag_max, min_history)
            if q.num_rows:
                _score(proc, q, n, sorted_w, top_pop, ks, sums)
    queries = sums.pop("queries")
    if queries == 0:
        raise ValueError(f"no evaluation users on day {day.isoformat()} in {log_dir}")
    out = {"eval_day": day.isoformat(), "queries": queries, "min_history": min_history}
    out.update({k: v / queries for k, v in sums.items()})
    return out
