"""Training loader: windows, determinism, exact resumption (in process and inside Ray Train), KJT helper."""

import json
import threading
from collections import Counter

import numpy as np
import pytest
import torch

from data.config import SynthConfig
from data.loader import WindowLoader, cut_windows, reshard_state
from data.prefetch import Prefetcher
from data.sequences import build_sequences, list_parts, read_sequences
from data.synth import generate

L, B = 8, 16


def test_windows_cover_every_transition_once_left_padded():
    off = np.array([0, 1, 3, 13])  # users with 1, 2 and 10 events
    items = np.array([5, 6, 7, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29])
    user, inp, tgt = cut_windows(np.array([1, 2, 3]), off, items, seq_len=4)
    assert user.tolist() == [2, 3, 3, 3]
    assert inp.tolist() == [[0, 0, 0, 6], [25, 26, 27, 28], [21, 22, 23, 24], [0, 0, 0, 20]]
    assert tgt.tolist() == [[0, 0, 0, 7], [26, 27, 28, 29], [22, 23, 24, 25], [0, 0, 0, 21]]


@pytest.fixture(scope="module")
def seq_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    cfg = SynthConfig(users=300, items=200, days=2, seed=4, events_per_user=30, users_per_chunk=100, workers=1)
    generate(cfg, root / "log")
    build_sequences(root / "log", root / "seq", backend="arrow", rows_per_bucket=3000)  # several shards
    return root / "seq"


def _pairs(batches) -> Counter:
    """Multiset of (user, input, target) over the non-padding positions."""
    out: Counter = Counter()
    for b in batches:
        for u, i, t in zip(b["user_ids"].tolist(), b["input_ids"].tolist(), b["targets"].tolist()):
            out.update((u, a, c) for a, c in zip(i, t) if a)
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_epoch_holds_every_transition_and_shapes(seq_dir):
    seqs = read_sequences(seq_dir)
    off, items = list_parts(seqs.column("item_ids"))
    users = seqs.column("user_id").to_numpy()
    want = Counter((int(users[r]), int(items[j]), int(items[j + 1]))
                   for r in range(len(users)) for j in range(off[r], off[r + 1] - 1))
    batches = list(WindowLoader(seq_dir, seq_len=L, batch_size=B, seed=0, shuffle_buffer=64))
    assert _pairs(batches) == want
    assert all(b["input_ids"].shape == (B, L) and b["input_ids"].dtype == torch.int64 for b in batches[:-1])
    assert all(((b["input_ids"] == 0) == (b["targets"] == 0)).all() for b in batches)


def test_deterministic_per_seed_and_epoch(seq_dir):
    a = WindowLoader(seq_dir, seq_len=L, batch_size=B, seed=3, shuffle_buffer=64)
    e0, e1 = list(a), list(a)
    assert _same(e0, list(WindowLoader(seq_dir, seq_len=L, batch_size=B, seed=3, shuffle_buffer=64)))
    assert not _same(e0, e1) and _pairs(e0) == _pairs(e1)  # reshuffled each epoch, same content
    assert not _same(e0, list(WindowLoader(seq_dir, seq_len=L, batch_size=B, seed=4, shuffle_buffer=64)))


def _check_resume(make, stop_at: int, epochs: int = 2) -> None:
    full = make()
    want = [b for _ in range(epochs) for b in full]  # uninterrupted epochs
    first = make()
    got = []
    for batch in first:
        got.append(batch)
        if len(got) == stop_at:
            break
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
    assert state["epoch"] == 0 and state["batches_consumed"] == stop_at
    resumed = make()
    resumed.load_state_dict(state)
    got += [b for _ in range(epochs) for b in resumed]  # the rest of epoch 0, then the next ones
    assert _same(got, want)


def test_restored_loader_yields_exactly_the_uninterrupted_batches(seq_dir):
    _check_resume(lambda: WindowLoader(seq_dir, seq_len=L, batch_size=B, seed=5, shuffle_buffer=100), stop_at=7)


def test_prefetching_loader_yields_the_same_batches_and_resumes_the_same(seq_dir):
    def make(prefetch):
        return WindowLoader(seq_dir, seq_len=L, batch_size=B, seed=5, shuffle_buffer=100, prefetch=prefetch)

    plain, ahead = make(0), make(3)
    assert _same([b for _ in range(2) for b in plain], [b for _ in range(2) for b in ahead])
    # the thread runs ahead, the position counts what the consumer took
    _check_resume(lambda: make(3), stop_at=7)
    threads = threading.active_count()
    _check_resume(lambda: make(1), stop_at=1)
    assert threading.active_count() == threads  # stopping early stopped the thread


def test_prefetching_loader_raises_the_producers_error_at_its_batch(seq_dir, monkeypatch):
    loader = WindowLoader(seq_dir, seq_len=L, batch_size=B, seed=5, shuffle_buffer=100, prefetch=2)
    real = loader._epoch_batches

    def failing(epoch):
        for i, arrays in enumerate(real(epoch)):
            if i == 3:
                raise OSError("disk went away")
            yield arrays

    monkeypatch.setattr(loader, "_epoch_batches", failing)
    got = []
    with pytest.raises(OSError, match="disk went away"):
        for batch in loader:
            got.append(batch)
    assert len(got) == 3 and loader.batches_consumed == 3 and loader.epoch == 0


def test_prefetcher_keeps_order_and_stops_when_closed():
    made = []

    def items():
        for i in range(1000):
            made.append(i)
            yield i

    with Prefetcher(items(), depth=4) as ahead:
        assert [next(ahead) for _ in range(10)] == list(range(10))
    assert len(made) <= 10 + 4 + 1  # at most the queue and the item in hand beyond what was taken
    assert list(Prefetcher(range(50), depth=1)) == list(range(50))
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(range(3), depth=0)


def test_state_from_another_seed_is_refused(seq_dir):
    loader = WindowLoader(seq_dir, seq_len=L, batch_size=B, seed=1)
    with pytest.raises(ValueError, match="seed"):
        loader.load_state_dict({"epoch": 0, "batches_consumed": 3, "seed": 2})


def _worker(config: dict) -> None:
    """Ray Train worker: read its share of the rows, then check a restored loader replays the same batches."""
    import ray.train

    from data.loader import WindowLoader

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    kw = dict(seq_len=config["L"], batch_size=config["B"], seed=9, shuffle_buffer=50, rank=rank,
              world_size=ctx.get_world_size(), read_rows=32)
    full = [{k: v.tolist() for k, v in b.items()} for b in WindowLoader(config["seq_dir"], **kw)]
    resumed = WindowLoader(config["seq_dir"], **kw)
    resumed.load_state_dict({"epoch": 0, "batches_consumed": 2, "seed": 9})
    rest = [{k: v.tolist() for k, v in b.items()} for b in resumed]
    with open(f"{config['out']}/rank{rank}.json", "w") as f:
        json.dump({"full": full, "rest": rest}, f)


@pytest.mark.ray_train
def test_ray_train_shards_cover_the_data_and_resume(seq_dir, tmp_path, ray_local):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _worker,
        train_loop_config={"L": L, "B": B, "out": str(tmp_path), "seq_dir": str(seq_dir)},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
    )
    trainer.fit()
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for res in results:
        assert len(res["full"]) > 2 and res["rest"] == res["full"][2:]
    got = _pairs({k: torch.tensor(v) for k, v in b.items()} for res in results for b in res["full"])
    assert got == _pairs(WindowLoader(seq_dir, seq_len=L, batch_size=B))


# ---------------------------------------------------------------- row shares


def test_row_shares_are_contiguous_balanced_and_cover_every_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.shards import RowShard

    # three files, 23 + 0 + 40 rows, with row groups of 7 rows: shares cut across files and row groups
    files = []
    for i, (a, b) in enumerate([(0, 23), (23, 23), (23, 63)]):
        files.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(pa.table({"x": pa.array(range(a, b), pa.int64())}), files[-1], row_group_size=7)
    for world in (1, 2, 3, 5, 64, 70):
        shards = [RowShard(files, r, world) for r in range(world)]
        rows = [[v for t in s.iter_tables(["x"], batch_rows=4) for v in t.column("x").to_pylist()] for s in shards]
        assert [v for r in rows for v in r] == list(range(63))  # in order, none dropped or repeated
        assert max(map(len, rows)) - min(map(len, rows)) <= 1
        # a permuted piece order holds the same rows
        again = [v for s in shards for t in s.iter_tables(["x"], order_seed=(1, 2)) for v in t.column("x").to_pylist()]
        assert sorted(again) == list(range(63))
    with pytest.raises(ValueError, match="rank 2 is not in"):
        RowShard(files, 2, 2)


def test_rebatched_shares_have_full_batches_and_the_count_every_rank_expects(tmp_path):
    import math

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data.shards import RowShard, rebatch
    from trainer.distributed.collectives import padded

    files = []  # row groups of 7 rows and a file boundary: iter_tables alone gives short tables
    for i, (a, b) in enumerate([(0, 23), (23, 61)]):
        files.append(str(tmp_path / f"part-{i}.parquet"))
        pq.write_table(pa.table({"x": pa.array(range(a, b), pa.int64())}), files[-1], row_group_size=7)
    for world, size in [(1, 5), (2, 4), (3, 10), (4, 64)]:
        shards = [RowShard(files, r, world) for r in range(world)]
        most = math.ceil(math.ceil(61 / world) / size)  # what the evaluation loop computes
        got = []
        for s in shards:
            tables = list(rebatch(s.iter_tables(["x"], batch_rows=size), size))
            assert [t.num_rows for t in tables[:-1]] == [size] * (len(tables) - 1) and 0 < tables[-1].num_rows <= size
            assert len(tables) <= most
            stepped = list(padded(tables, most))
            assert len(stepped) == most and stepped[len(tables):] == [None] * (most - len(tables))
            got += [v for t in tables for v in t.column("x").to_pylist()]
        assert got == list(range(61))
        assert max(len(list(rebatch(s.iter_tables(["x"], batch_rows=size), size))) for s in shards) == most
    with pytest.raises(RuntimeError, match="more than the 2 items"):
        list(padded(range(3), 2))


def test_two_ranks_get_balanced_batches_of_a_single_file(tmp_path):
    cfg = SynthConfig(users=100, items=50, days=2, seed=1, events_per_user=20, users_per_chunk=100, workers=1)
    generate(cfg, tmp_path / "log")
    build_sequences(tmp_path / "log", tmp_path / "seq", backend="arrow")  # one shard
    counts = [len(list(WindowLoader(tmp_path / "seq", seq_len=L, batch_size=B, rank=r, world_size=2)))
              for r in (0, 1)]
    assert min(counts) > 2 and min(counts) >= 0.8 * max(counts)


def _windows(batches) -> Counter:
    """Multiset of whole windows (user, inputs, targets): a window trained twice counts twice."""
    return Counter((u, tuple(i), tuple(t)) for b in batches
                   for u, i, t in zip(b["user_ids"].tolist(), b["input_ids"].tolist(), b["targets"].tolist()))


def _interrupted(seq_dir, world: int, steps: int, states=None):
    """`world` loaders after `steps` agreed steps of their epoch (a rank out of data stops early), restored
    from `states` (resharded) when given: (their batches, their states)."""
    loaders = [WindowLoader(seq_dir, seq_len=L, batch_size=B, seed=3, shuffle_buffer=64, rank=r, world_size=world)
               for r in range(world)]
    if states is not None:
        for r, loader in enumerate(loaders):
            loader.load_state_dict(reshard_state(states, world, r, loader.stream_batches))
    taken = []
    for loader in loaders:
        it = iter(loader)
        for _ in range(min(steps, loader.num_batches() - loader.batches_consumed)):
            taken.append(next(it))
    return taken, [loader.state_dict() for loader in loaders], loaders


@pytest.mark.parametrize("worlds", [(2, 1), (1, 2), (2, 3), (3, 2, 1)])
def test_resharded_epoch_trains_every_window_once(seq_dir, worlds):
    """An epoch interrupted on one world size and continued on others holds every window exactly once,
    and the new ranks' shares differ by at most one batch."""
    whole = _windows(WindowLoader(seq_dir, seq_len=L, batch_size=B, seed=3, shuffle_buffer=64))
    taken, states, _ = _interrupted(seq_dir, worlds[0], steps=3)
    for world in worlds[1:]:
        more, states, loaders = _interrupted(seq_dir, world, steps=2, states=states)
        counts = [loader.num_batches() for loader in loaders]
        assert max(counts) - min(counts) <= 1
        taken += more
    rest = []
    for state in states:  # finish the epoch on the last world
        loader = WindowLoader(seq_dir, seq_len=L, batch_size=B, seed=3, shuffle_buffer=64, rank=state["rank"],
                              world_size=state["world_size"])
        loader.load_state_dict(state)
        rest += list(loader)
        assert loader.epoch == 1 and loader.state_dict()["plan"] is None  # the next epoch is the world's own
    assert _windows(taken + rest) == whole
    assert len(taken) > 0 and len(rest) > 0


def test_reshard_at_an_epoch_boundary_uses_the_new_worlds_streams(seq_dir):
    loaders = [WindowLoader(seq_dir, seq_len=L, batch_size=B, seed=3, shuffle_buffer=64, rank=r, world_size=2)
               for r in range(2)]
    for loader in loaders:
        list(loader)  # the whole epoch
    states = [loader.state_dict() for loader in loaders]
    assert all(s["batches_consumed"] == 0 and s["epoch"] == 1 for s in states)
    new = reshard_state(states, 3, 1, loaders[0].stream_batches)
    assert new == {**new, "epoch": 1, "batches_consumed": 0, "plan": None, "rank": 1, "world_size": 3}


def test_loader_state_of_another_rank_is_refused(seq_dir):
    _, states, _ = _interrupted(seq_dir, 2, steps=1)
    loader = WindowLoader(seq_dir, seq_len=L, batch_size=B, seed=3, shuffle_buffer=64, rank=0, world_size=3)
    with pytest.raises(ValueError, match="reshard_state"):
        loader.load_state_dict(states[0])
