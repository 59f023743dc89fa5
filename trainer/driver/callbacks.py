"""Ray Train callbacks (they run in the controller, on the head node).

`MetricsLog` appends every report to OUT/metrics.jsonl and, when `output.storage` is set, copies that file
there with every checkpoint (object stores cannot append; the driver copies it once more at the end).
Further callbacks are named in `output.callbacks` as "module:Class" and built with no arguments, so MLflow,
TensorBoard or any `ray.train.UserCallback` attaches by config,
e.g. output.callbacks=["my_team.tracking:MlflowCallback"].
"""

import importlib
import json
import time
from pathlib import Path
from typing import Any, Optional

from ray.train import UserCallback

from trainer import storage
from trainer.config import Config
from trainer.storage import Location


class MetricsLog(UserCallback):
    """`run_dir`: the Ray Train run's location, to name checkpoints by URI; `mirror`: where to copy the log."""

    def __init__(self, path: Path, run_dir: Optional[Location] = None, mirror: Optional[Location] = None) -> None:
        self.path, self.run_dir, self.mirror = Path(path), run_dir, mirror

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Optional[Any]) -> None:
        record = {"time": time.time(), **(metrics[0] if metrics else {})}  # rank 0's view
        if checkpoint is not None:
            name = storage.name_of(self.run_dir, checkpoint.path) if self.run_dir else checkpoint.path
            record["checkpoint"] = str(name)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        if checkpoint is not None and self.mirror is not None:
            storage.copy_quietly(self.path, self.mirror)  # the driver copies it again at the end


def load_callback(spec: str) -> UserCallback:
    module_name, sep, cls_name = spec.partition(":")
    if not sep:
        raise ValueError(f"output.callbacks entry {spec!r} must look like module.path:ClassName")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"output.callbacks entry {spec!r} cannot be loaded: {e}") from None
    callback = cls()
    if not isinstance(callback, UserCallback):
        raise ValueError(f"output.callbacks entry {spec!r} is not a ray.train.UserCallback")
    return callback


def build_callbacks(cfg: Config, out: Path, run_dir: Optional[Location] = None,
                    mirror: Optional[Location] = None) -> list[UserCallback]:
    return [MetricsLog(out / "metrics.jsonl", run_dir, mirror), *(load_callback(s) for s in cfg.output.callbacks)]
