"""The serving package's user error, in a module that imports nothing (trainer/errors.py lists it)."""


class ModelDirError(ValueError):
    """A model directory that is missing, incomplete or not one: the message names the path."""
