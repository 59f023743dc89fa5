"""DataConfig / SynthConfig validation: every bad value is a ValueError naming its dotted key."""

import dataclasses

import pytest

from data.config import DataConfig, SynthConfig, VocabConfig

BAD_DATA = {
    "path": 3,
    "synth": {"users": 1},
    "eval_day": "2026-13-01",
    "train_days": -1,
    "min_history": 0,
    "max_bad_fraction": 1.5,
    "backend": "spark",
    "split": "k_fold",
    "shuffle_buffer": 0,
    "prefetch": -1,
    "rows_per_bucket": 0,
    "vocab": 3,
    "ts_unit": "minutes",
}
BAD_SYNTH = {
    "users": 0, "items": 0, "days": 0, "seed": -1, "events_per_user": 1.0, "events_sigma": -0.5, "zipf_s": -1.0,
    "p_transition": 1.5, "p_repeat": -0.1, "neighbours": 0, "lag_min": 0, "lag_max": 0,
    "new_item_fraction": 1.0, "session_len": 0.5, "start_day": "tomorrow", "users_per_chunk": 0, "workers": -1,
    "raw_ids": "uuid",
}
BAD_VOCAB = {"build": "sometimes", "min_count": 0, "max_items": -1}


def test_every_data_field_is_checked():
    assert set(BAD_DATA) == {f.name for f in dataclasses.fields(DataConfig)}
    for name, value in BAD_DATA.items():
        with pytest.raises(ValueError, match=rf"data\.{name}"):
            DataConfig(**{name: value})


def test_every_synth_field_is_checked():
    assert set(BAD_SYNTH) == {f.name for f in dataclasses.fields(SynthConfig)}
    for name, value in BAD_SYNTH.items():
        with pytest.raises(ValueError, match=rf"data\.synth\.{name}"):
            SynthConfig(**{name: value})


def test_every_vocab_field_is_checked():
    assert set(BAD_VOCAB) == {f.name for f in dataclasses.fields(VocabConfig)}
    for name, value in BAD_VOCAB.items():
        with pytest.raises(ValueError, match=rf"data\.vocab\.{name}"):
            VocabConfig(**{name: value})


def test_mixture_must_leave_room_for_popularity():
    with pytest.raises(ValueError, match="p_transition \\+ data.synth.p_repeat"):
        SynthConfig(p_transition=0.6, p_repeat=0.4)
    with pytest.raises(ValueError, match="data.synth.lag_max"):
        SynthConfig(lag_min=300, lag_max=200)


def test_defaults_are_valid():
    cfg = DataConfig()
    assert cfg.synth.p_popularity == pytest.approx(0.5)
