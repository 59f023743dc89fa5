"""The one config tree: typed dataclasses loaded from YAML, with dotted CLI overrides.

    cfg = load_config("configs/smoke.yaml", ["model.kernel_size=64", "training.lr=3e-4"])

Every user mistake (unknown key, wrong type, impossible combination) is a ValueError that
names the dotted key. Sections validate themselves in __post_init__; Config checks the
combinations that span sections.
"""

import dataclasses
import datetime as dt
import importlib.metadata
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union
from urllib.parse import urlparse

import yaml

from data.config import DataConfig
from model.config import LossConfig, ModelConfig
from trainer import storage
from trainer.errors import ConfigError

# MLflow's own tracking-store schemes; the database ones need SQLAlchemy, which mlflow-skinny lacks
MLFLOW_REMOTE = ("http", "https", "databricks", "databricks-uc", "uc")
MLFLOW_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")


def check_mlflow_uri(uri: str) -> None:
    """A ValueError naming output.mlflow_uri unless MLflow (as installed) can open `uri`: a local path or
    file:///abs/path (a file store), http(s)://host[:port] (a tracking server), databricks, a database URI
    when SQLAlchemy is installed, or a scheme a plugin registers. Checked without importing MLflow."""
    if not uri:
        return
    where = f"output.mlflow_uri={uri!r}"
    if uri != uri.strip():
        raise ValueError(f"{where} has leading or trailing whitespace")
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if uri in MLFLOW_REMOTE[2:]:  # a bare "databricks" (the default profile) is not a path
        return
    if not scheme:
        return  # a local path: a file store there
    if scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ValueError(f"{where}: a file store URI needs an absolute path, file:///abs/path "
                             "(or give a plain path)")
        return
    if scheme in ("http", "https"):
        if not parsed.netloc:
            raise ValueError(f"{where}: an http(s) tracking URI needs a host, e.g. http://mlflow.example:5000")
        return
    if scheme in MLFLOW_REMOTE:
        return
    if scheme.split("+")[0] in MLFLOW_DATABASES:  # postgresql+psycopg2://...
        if importlib.util.find_spec("sqlalchemy") is None:
            raise ValueError(f"{where}: a database tracking store needs the full mlflow package (SQLAlchemy); "
                             "this environment has mlflow-skinny: use a file store path or an http(s) server")
        return
    if scheme in {ep.name for ep in importlib.metadata.entry_points(group="mlflow.tracking_store")}:
        return
    raise ValueError(f"{where} is not a tracking URI MLflow accepts: use a local path, file:///abs/path, "
                     f"http(s)://host:port or one of {', '.join(MLFLOW_REMOTE[2:] + MLFLOW_DATABASES)}")


@dataclass
class TrainingConfig:
    seed: int = 0
    epochs: int = 1
    max_steps: int = 0  # stop after this many optimizer steps; 0 means run all epochs
    batch_size: int = 128  # sequences per worker per step
    # all: next-item loss at every position (needs a causal mixer); last: only the final position.
    positions: Literal["all", "last"] = "all"
    lr: float = 1e-3  # dense tower (AdamW via DeepSpeed)
    weight_decay: float = 0.0
    sparse_optimizer: Literal["rowwise_adagrad", "adam"] = "rowwise_adagrad"
    sparse_lr: float = 0.05
    grad_clip: float = 1.0  # 0 disables
    on_nonfinite_loss: Literal["stop", "skip"] = "stop"
    max_failures: int = 0  # worker failures Ray Train recovers from (restarting from the latest checkpoint)
    log_every: int = 20
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_failures < 0:
            raise ValueError(f"training.max_failures must be >= 0, got {self.max_failures}")
        if self.max_steps < 0:
            raise ValueError(f"training.max_steps must be >= 0, got {self.max_steps}")
        for name in ("lr", "sparse_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"training.{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("training.weight_decay and training.grad_clip must be >= 0")


@dataclass
class DistributedConfig:
    num_workers: int = 2
    cpus_per_worker: float = 0.5  # fractional so Ray Data keeps CPUs on a 2-core machine
    # true/false, or auto: GPUs when the cluster has one per worker. A bare yes/no (YAML reads it as a
    # boolean) and a quoted 'yes'/'no' mean the same as true/false; the config holds True, False or "auto".
    use_gpu: Union[bool, Literal["auto", "yes", "no"]] = "auto"
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with CUDA, gloo otherwise
    sharding: Literal["auto", "table_wise", "row_wise", "column_wise"] = "auto"  # auto: the planner's choice
    zero_stage: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    activation_checkpointing: bool = False
    # Ray placement of the workers: pack fills a node first (one NCCL host per node); spread puts them on
    # different nodes where it can (ScalingConfig.placement_strategy).
    placement: Literal["pack", "spread"] = "pack"
    # Planner memory caps per device, in GiB; 0 means what the device reports.
    hbm_cap_gib: float = 0.0
    ddr_cap_gib: float = 0.0

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"distributed.num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"distributed.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"distributed.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if self.use_gpu in ("yes", "no"):
            self.use_gpu = self.use_gpu == "yes"
        if not (isinstance(self.use_gpu, bool) or self.use_gpu == "auto"):
            raise ValueError(
                f"distributed.use_gpu must be true, false or 'auto' (yes/no also accepted), got {self.use_gpu!r}"
            )
        if self.backend == "nccl" and self.use_gpu is False:
            raise ValueError("distributed.backend='nccl' needs GPUs but distributed.use_gpu is false")


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 50, 100])
    exclude_seen: bool = False  # score already-seen items as -inf
    batch_size: int = 512  # queries per scoring step
    popularity_baseline: bool = True
    oracle: bool = True  # synthetic logs only
    # With a validation split (data.split=leave_one_out): validate every `every_epochs` epochs, keep the
    # weights that score best on `select`, stop after `patience` validations without improvement (0: never)
    # once `patience_steps` optimizer steps have also passed since the best one, and report test metrics of
    # the best weights. The test split never steers training. Patience in steps as well as validations: on a
    # few hundred users an epoch is a handful of steps and validation is noisy, so epochs alone would stop a
    # run after a few dozen steps; on large data the validations are the binding count.
    every_epochs: int = 1
    patience: int = 0
    patience_steps: int = 200
    select: str = "ndcg@10"

    def __post_init__(self) -> None:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError(f"eval.ks must be a non-empty list of positive ints, got {self.ks}")
        if self.batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {self.batch_size}")
        if self.every_epochs < 1 or self.patience < 0:
            raise ValueError(f"eval.every_epochs must be >= 1 and eval.patience >= 0, got {self.every_epochs}, "
                             f"{self.patience}")
        if self.patience_steps < 0:
            raise ValueError(f"eval.patience_steps must be >= 0, got {self.patience_steps}")
        name, _, k = self.select.partition("@")
        if not (self.select == "mrr" or (name in ("hr", "ndcg", "recall") and k.isdigit() and int(k) in self.ks)):
            raise ValueError(f"eval.select must be 'mrr' or hr|ndcg|recall@k with k in eval.ks={self.ks}, "
                             f"got {self.select!r}")


@dataclass
class OutputConfig:
    dir: str = "runs/default"  # prepared data, results.json, metrics.jsonl, embeddings; a path every node mounts
    # Ray Train storage (checkpoints) and a copy of results.json / metrics.jsonl: a local path or a URI
    # pyarrow.fs understands (s3://bucket/runs/x, gs://..., hdfs://..., file:///...); "" means OUT/ray.
    storage: str = ""
    checkpoint_every: int = 0  # steps; 0 means only at the end of each epoch
    keep_checkpoints: int = 2
    export_embeddings: bool = False
    # OUT/model at the end of the run: the self-contained model directory for serving (trainer/export.py). Off
    # by default: it writes a second copy of the whole table, and `convformer-export` makes one from any
    # checkpoint later. On, it is the only export that holds a validated run's selected weights.
    export_model: bool = False
    callbacks: list[str] = field(default_factory=list)  # "module:Class" ray.train.UserCallback (a team's own)
    tensorboard: bool = True  # TensorBoard event files under OUT/tb/ (trainer/driver/tracking.py)
    # MLflow tracking URI; "" is off. A local path or file:///abs/path (a file store), http(s)://host:port (a
    # tracking server), databricks. One run per training run, in experiment `mlflow_experiment`.
    mlflow_uri: str = ""
    mlflow_experiment: str = "convformer"

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("output.checkpoint_every must be >= 0 and output.keep_checkpoints >= 1")
        if storage.is_uri(self.storage):
            try:
                storage.resolve(self.storage)
            except Exception as e:  # ArrowInvalid (unknown scheme, bad URI), OSError (e.g. no libhdfs, S3 region)
                raise ValueError(
                    f"output.storage={self.storage!r} is not a storage location pyarrow can open: {e}"
                ) from None
        check_mlflow_uri(self.mlflow_uri)
        if self.mlflow_uri and not self.mlflow_experiment.strip():
            raise ValueError("output.mlflow_experiment must be a non-empty name when output.mlflow_uri is set")


@dataclass
class DebugConfig:
    """Fault injection for the reliability tests (trainer/worker/faults.py); 0 and false disable it.
    Kill rank `kill_rank` (SIGKILL) before step N of a run not yet restarted (with kill_in_save: halfway
    through uploading step N's checkpoint); make the loss NaN at step N."""

    kill_at_step: int = 0
    kill_rank: int = 0
    kill_in_save: bool = False
    nan_at_step: int = 0

    def __post_init__(self) -> None:
        if min(self.kill_at_step, self.kill_rank, self.nan_at_step) < 0:
            raise ValueError("debug.kill_at_step, debug.kill_rank and debug.nan_at_step must be >= 0")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        if self.training.positions == "all" and not self.model.causal:
            raise ValueError(
                f"training.positions='all' needs a causal mixer, but model.mixer='{self.model.mixer}' with "
                f"model.padding='{self.model.padding}' lets position t see later inputs; "
                "use model.padding=zero or training.positions=last"
            )
        every = self.output.checkpoint_every
        if self.debug.kill_in_save and not (every and self.debug.kill_at_step % every == 0):
            raise ValueError(
                f"debug.kill_in_save needs a checkpoint at debug.kill_at_step="
                f"{self.debug.kill_at_step}: make it a multiple of output.checkpoint_every={every}"
            )
        # model.num_items 0 means "from the data" (trainer/driver/launch.py sizes the table); a dense synthetic
        # log's size is known now (raw ids go through a vocabulary, which may keep fewer items)
        dense = self.data.synth.raw_ids == "dense" and self.data.vocab.build != "always"
        if not self.data.path and dense and 0 < self.model.num_items < self.data.synth.items:
            raise ValueError(
                f"data.synth.items={self.data.synth.items} exceeds model.num_items={self.model.num_items}: "
                "the item table must hold every generated item"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading


def load_config(path: Optional[Union[str, Path]] = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Load `path` (YAML; None for all defaults), apply `key.sub=value` overrides, validate. Any mistake is a
    ConfigError (a ValueError) naming the file or the key."""
    try:
        return _load(path, overrides)
    except ConfigError:
        raise
    except ValueError as e:  # the sections' own checks (__post_init__) raise plain ValueError
        raise ConfigError(str(e)) from None


def _load(path: Optional[Union[str, Path]], overrides: typing.Sequence[str]) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, ValueError) as e:  # ValueError: an impossible date such as 2026-13-01
            raise ValueError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        apply_override(raw, item)
    return from_dict(Config, raw)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (so 3, 1e-3, true, [1, 5])."""
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {item!r} must look like section.key=value")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {part} is not a section")
    try:
        node[leaf] = yaml.safe_load(text) if text.strip() else ""
    except (yaml.YAMLError, ValueError):  # ValueError: what looks like an impossible date, 2026-13-01
        node[leaf] = text


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ValueError(f"unknown key {prefix}{unknown[0]}; valid keys in {where}: {', '.join(names)}")
    kwargs = {name: _coerce(hints[name], raw[name], f"{prefix}{name}") for name in names if name in raw}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key + ".")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, key)
        for option in inner:  # the first that takes the value, e.g. Union[bool, Literal["auto"]]
            try:
                return _coerce(option, value, key)
            except ValueError:
                pass
        raise ValueError(f"{key} must be {' or '.join(_describe(option) for option in inner)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}={value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, dt.date):  # YAML reads 2000-12-08 (unquoted, in a file or an override) as a date
            value = value.isoformat()
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has unsupported type {tp}")  # a bug in the tree, not user input


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return {bool: "true, false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))
