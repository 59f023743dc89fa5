"""Runs in each Ray Train worker: the model stack, the training loop, checkpoints, fault injection."""
