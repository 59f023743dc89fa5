"""User errors: mistakes in what the user gave the trainer (the config, a log, a path, the resources asked
for, a checkpoint to resume). The entry point prints such an error as one line, `error: <message>`, and
exits 2; any other exception is an internal error (traceback, exit 1). See trainer/train.py.

This module is the one list of what counts as a user error (`USER_ERRORS`):

- `UserError` and its subclasses: `ConfigError` (load_config), `trainer.checkpoint.CheckpointError`, and what
  the driver refuses up front (resources, an output.dir that holds a run, a table smaller than the data);
- `data.schema.LogError`: a log that cannot be used (the data package knows nothing of the trainer);
- `trainer.serving.errors.ModelDirError`: a model directory that is missing or incomplete (serving loads
  without Ray, so it cannot derive from `UserError` here).

Errors raised in Ray tasks or Ray Train workers arrive wrapped (RayTaskError, WorkerGroupError,
ControllerError, UserExceptionWithTraceback): `find_user_error` looks through the wrappers for the user error.
"""

from contextlib import contextmanager
from typing import Iterator, Optional

from ray.exceptions import RayTaskError

from data.schema import LogError
from trainer.serving.errors import ModelDirError


class UserError(ValueError):
    """A mistake in the user's input whose message alone says what to fix (a ValueError, as before)."""


class ConfigError(UserError):
    """The config file or an override is wrong: the message names the key and the value."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, LogError, ModelDirError)


@contextmanager
def user_input() -> Iterator[None]:
    """ValueErrors raised inside the block are about the user's input: re-raise them as UserError (same
    message). For checks that live outside the trainer and raise plain ValueError."""
    try:
        yield
    except USER_ERRORS:
        raise
    except ValueError as e:
        raise UserError(str(e)) from e


def _inner(e: BaseException) -> list[BaseException]:
    """The exceptions a wrapper carries: Ray's task and Train errors, then Python's own chain."""
    found: list = [getattr(e, "cause", None),  # RayTaskError: the exception raised in the task
                   getattr(e, "_base_exc", None),  # ray.train UserExceptionWithTraceback
                   getattr(e, "controller_failure", None)]  # ray.train ControllerError
    failures = getattr(e, "worker_failures", None)  # ray.train WorkerGroupError: {rank: exception}
    if isinstance(failures, dict):
        found += [failures[rank] for rank in sorted(failures)]
    found += [e.__cause__, e.__context__]
    return [x for x in found if isinstance(x, BaseException)]


def find_user_error(e: BaseException) -> Optional[BaseException]:
    """The user error `e` is or wraps (breadth-first, outermost first), else None."""
    seen: set[int] = set()
    queue = [e]
    while queue:
        cur = queue.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        # a RayTaskError also passes as an instance of its cause's class; its message is the remote traceback
        if isinstance(cur, USER_ERRORS) and not isinstance(cur, RayTaskError):
            return cur
        queue += _inner(cur)
    return None


def one_line(e: BaseException) -> str:
    """The error's message on one line: `error: ...`."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return "error: " + ("; ".join(lines) or type(e).__name__)
