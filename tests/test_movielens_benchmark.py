"""benchmarks/movielens.py reads each validation of a run from its metrics.jsonl, with the time to reach it."""

import json

from benchmarks.movielens import first_reaching, lever, milestones


def test_validations_and_the_time_to_each_level(tmp_path):
    log = tmp_path / "metrics.jsonl"
    rows = [
        {"time": 90.0, "step": 5, "epoch": 1, "valid/ndcg@10": 0.5},  # an earlier run's line: before `since`
        {"time": 110.0, "step": 20, "epoch": 0, "loss": 6.1},
        {"time": 160.0, "step": 68, "epoch": 1, "valid/ndcg@10": 0.16, "valid/hr@10": 0.3},
        {"time": 250.5, "step": 136, "epoch": 2, "valid/ndcg@10": 0.181, "valid/hr@10": 0.32},
        {"time": 330.0, "step": 204, "epoch": 3, "valid/ndcg@10": 0.175, "valid/hr@10": 0.31},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = milestones(log, since=100.0, select="ndcg@10")
    assert [(v["epoch"], v["step"], v["s"], v["ndcg@10"]) for v in got] == [(1, 68, 60.0, 0.16), (2, 136, 150.5, 0.181),
                                                                           (3, 204, 230.0, 0.175)]
    assert first_reaching(got, "ndcg@10", [0.15, 0.17, 0.19]) == {"0.15": 60.0, "0.17": 150.5, "0.19": None}
    assert milestones(tmp_path / "missing.jsonl", 0.0, "ndcg@10") == []


def test_a_run_is_labelled_by_what_it_overrides():
    assert lever("x", {"overrides": []}) == "config defaults"
    assert lever("x", {"overrides": ["training.loss.type=full_softmax", "model.block=pre_norm"]}) == \
        "loss.type=full_softmax, block=pre_norm"
