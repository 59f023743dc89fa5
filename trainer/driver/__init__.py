"""Runs on the driver (the process that calls `trainer.train`): the Ray Train job, results, reports."""
