"""Item popularity counts over a window of days."""

import datetime as dt

import numpy as np
import pytest

from data.schema import LogError, list_days
from data.stats import item_counts, window_days
from tests.helpers import write_log

EVENTS = [(1, 3, "2026-01-01 10:00:00"), (2, 3, "2026-01-01 11:00:00"), (1, 1, "2026-01-02 10:00:00"),
          (3, 5, "2026-01-03 10:00:00"), (3, 3, "2026-01-03 11:00:00")]


def test_counts_per_item_over_chosen_days(tmp_path):
    write_log(tmp_path, EVENTS)
    assert item_counts(tmp_path, None, 5).tolist() == [0, 1, 0, 3, 0, 1]
    days = window_days("2026-01-03", 0, list_days(tmp_path))  # the training days of a split on the 3rd
    got = item_counts(tmp_path, days, 6)
    assert got.dtype == np.int64 and got.shape == (7,) and got.tolist() == [0, 1, 0, 2, 0, 0, 0]
    assert item_counts(tmp_path, ["2026-01-03"], 5).tolist() == [0, 0, 0, 1, 0, 1]


def test_window_days():
    days = [dt.date(2026, 1, d) for d in range(1, 8)]
    assert window_days("2026-01-05", 2, days) == [dt.date(2026, 1, 3), dt.date(2026, 1, 4)]
    assert window_days("2026-01-03", 0, days) == days[:2]


def test_item_id_above_num_items_is_an_error(tmp_path):
    write_log(tmp_path, EVENTS)
    with pytest.raises(LogError, match="item_id 5 is above num_items=4"):
        item_counts(tmp_path, None, 4)


def test_num_items_from_footers_and_metadata(tmp_path):
    from data.config import SynthConfig
    from data.stats import num_items
    from data.synth import generate

    write_log(tmp_path / "log", EVENTS)
    assert num_items(tmp_path / "log") == 5
    cfg = SynthConfig(users=20, items=77, days=1, workers=1)
    assert num_items(generate(cfg, tmp_path / "synth")) == 77
