"""The function Ray Train runs on every worker, in a module of its own so that the driver can name it
without importing the worker stack (TorchRec, FBGEMM, DeepSpeed: about 3 s of imports, which the driver
never uses): a config error or a malformed log is reported that much sooner."""

from typing import Any


def train_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    from trainer.worker.loop import train_worker as run  # heavy: on the worker only

    return run(loop_config)
