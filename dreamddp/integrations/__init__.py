"""Adapters that put DreamDDP inside other training frameworks.

Each adapter lives in its own module and imports its framework only when it is imported
itself, so ``import dreamddp`` never needs an optional dependency:

- ``dreamddp.integrations.deepspeed`` (extra ``[deepspeed]``): a DeepSpeed engine whose
  gradient all-reduce is replaced by DreamDDP's scheduled parameter averaging.
"""
