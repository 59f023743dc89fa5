"""The config tree: every shipped config loads; mistakes are refused with the key named."""

from pathlib import Path

import pytest
import ray

from tests.helpers import dump_config
from trainer.config import Config, load_config
from trainer.driver import launch

# Trainer configs; sweep definitions under configs/scaling/ are loaded by tests/test_scaling.py.
ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted([*ROOT.joinpath("configs").glob("*.yaml"), *ROOT.joinpath("configs", "movielens").glob("*.yaml")])


def test_configs_exist():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT / "configs").as_posix())
def test_every_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # the header documents how to launch it
    assert any(line.startswith("#") and "python -m" in line for line in path.read_text().splitlines()[:5])


def test_dump_round_trip(tmp_path):
    cfg = load_config(CONFIGS[0], ["model.kernel_size=16", "eval.ks=[1, 10]"])
    out = tmp_path / "c.yaml"
    out.write_text(dump_config(cfg))
    assert load_config(out) == cfg


def test_overrides_apply_with_types():
    cfg = load_config(None, ["model.kernel_size=16", "training.lr=3e-4", "eval.exclude_seen=true", "eval.ks=[1,10]"])
    assert cfg.model.kernel_size == 16 and cfg.training.lr == 3e-4
    assert cfg.eval.exclude_seen is True and cfg.eval.ks == [1, 10]
    assert isinstance(load_config(None, ["training.lr=1"]).training.lr, float)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["model.kernal_size=3"], r"unknown key model\.kernal_size"),
        (["modle.dim=3"], r"unknown key modle"),
        (["model.dim=big"], r"model\.dim must be an integer"),
        (["model.dim=3.5"], r"model\.dim must be an integer"),
        (["model.mixer=lstm"], r"model\.mixer='lstm' is not one of"),
        (["eval.exclude_seen=maybe"], r"eval\.exclude_seen must be true or false"),
        (["eval.ks=10"], r"eval\.ks must be a list"),
        (["model.kernel_size=100", "model.max_seq_len=50"], r"model\.kernel_size=100 exceeds model\.max_seq_len=50"),
        (["model.mixer=attention", "model.dim=30", "model.num_heads=4"], r"model\.dim=30 is not divisible"),
        (["model.padding=circular"], r"training\.positions='all' needs a causal mixer"),
        (["model.mixer=dwc", "model.padding=reflect"], r"training\.positions='all' needs a causal mixer"),
        (["model.mixer=fft", "model.padding=reflect", "training.positions=last"], r"reflect.*has no FFT form"),
        (["distributed.zero_stage=3"], r"distributed\.zero_stage must be 0, 1 or 2"),
        (["distributed.num_workers=0"], r"distributed\.num_workers must be >= 1"),
        (["training.loss.type=bce", "training.loss.in_batch_negatives=true"], r"in_batch_negatives needs"),
        (["data.eval_day=yesterday"], r"data\.eval_day must be a date"),
        (["model.dropout=1.0"], r"model\.dropout must be in"),
        (["model"], r"must look like section\.key=value"),
        (["model.dim.x=3"], r"model\.dim must be an integer"),
    ],
)
def test_mistakes_are_refused(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_non_causal_allowed_on_last_position():
    cfg = load_config(None, ["model.padding=circular", "model.mixer=dwc", "training.positions=last"])
    assert not cfg.model.causal


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ValueError, match="mapping at the top level"):
        load_config(scalar)


@pytest.mark.parametrize("override, match", [
    ("data.split=k_fold", "data.split=.k_fold. is not one of"),
    ("eval.select=ndcg@7", r"eval.select must be .* k in eval.ks"),
    ("eval.select=auc", "eval.select must be"),
    ("eval.patience=-1", "eval.patience"),
    ("eval.patience_steps=-5", "eval.patience_steps"),
    ("debug.kill_in_save=true", "kill_in_save needs a checkpoint"),
])
def test_selection_and_split_mistakes_are_refused(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


# distributed.use_gpu (issue #5): YAML reads a bare yes/no/true/false as a boolean; all of them are accepted.
@pytest.mark.parametrize("text,want", [
    ("true", True), ("yes", True), ("'yes'", True), ("True", True),
    ("false", False), ("no", False), ("'no'", False),
    ("auto", "auto"), ("'auto'", "auto"),
])
def test_use_gpu_takes_booleans_and_auto(text, want):
    assert load_config(None, [f"distributed.use_gpu={text}"]).distributed.use_gpu == want
    assert type(load_config(None, [f"distributed.use_gpu={text}"]).distributed.use_gpu) is type(want)


def test_use_gpu_from_yaml_round_trips(tmp_path):
    path = tmp_path / "gpu.yaml"
    path.write_text("distributed:\n  use_gpu: true\n")
    cfg = load_config(path)
    assert cfg.distributed.use_gpu is True
    out = tmp_path / "dumped.yaml"
    out.write_text(dump_config(cfg))
    assert load_config(out) == cfg


@pytest.mark.parametrize("text", ["maybe", "1", "0", "[true]", "null", "gpu"])
def test_use_gpu_refuses_anything_else(text):
    with pytest.raises(ValueError, match=r"distributed\.use_gpu must be true, false or one of 'auto'"):
        load_config(None, [f"distributed.use_gpu={text}"])


def test_use_gpu_no_refuses_nccl():
    with pytest.raises(ValueError, match=r"backend='nccl' needs GPUs but distributed\.use_gpu is false"):
        load_config(None, ["distributed.use_gpu=no", "distributed.backend=nccl"])
    assert load_config(None, ["distributed.use_gpu=yes", "distributed.backend=nccl"]).distributed.backend == "nccl"


def test_launch_use_gpu_follows_the_config(monkeypatch):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0, "GPU": 2.0})
    for text, want in [("true", True), ("yes", True), ("false", False), ("no", False), ("auto", True)]:
        assert launch.use_gpu(load_config(None, [f"distributed.use_gpu={text}"])) is want, text
    assert launch.use_gpu(load_config(None, ["distributed.use_gpu=auto", "distributed.num_workers=4"])) is False


def test_dates_work_unquoted_on_the_command_line_and_in_yaml(tmp_path):
    # YAML reads 2000-12-08 as a date; str fields take it as YYYY-MM-DD (issue #16)
    assert load_config(None, ["data.eval_day=2000-12-08"]).data.eval_day == "2000-12-08"
    assert load_config(None, ["data.eval_day='2000-12-08'"]).data.eval_day == "2000-12-08"
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  eval_day: 2000-12-08\n")
    assert load_config(path).data.eval_day == "2000-12-08"
    with pytest.raises(ValueError, match="data.eval_day must be a date YYYY-MM-DD, got '2026-13-01'"):
        load_config(None, ["data.eval_day=2026-13-01"])  # not a date to YAML either: refused by name
    path.write_text("data:\n  eval_day: 2026-13-01\n")
    with pytest.raises(ValueError, match=f"config file {path}"):
        load_config(path)
