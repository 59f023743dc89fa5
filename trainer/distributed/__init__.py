"""Distributed building blocks used inside workers: the rank context, collectives, the sharded table, DeepSpeed."""
