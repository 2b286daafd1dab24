"""Checks for values that enter from outside: config files, flags, public constructors.

Configuration is validated once, where it enters; code behind that edge trusts it. These
helpers hold the two rules every edge shares — a ``bool`` is not a number (``True`` would
otherwise pass as ``1``), and a number is an ``int`` or a ``float`` — so each caller only
names the value and what is allowed, and every message has one shape:
``<name> must be <what is allowed>, got <value!r>``, on one line.

``error`` lets an edge raise its own ``ValueError``/``RuntimeError`` subclass (the cluster's
``ClusterError``) with the same message.
"""

from __future__ import annotations

from typing import Any, TypeGuard

__all__ = [
    "is_int",
    "is_number",
    "non_negative_int",
    "non_negative_number",
    "positive_int",
    "positive_number",
    "require",
]


def is_int(value: object) -> TypeGuard[int]:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> TypeGuard[int | float]:
    """An ``int`` or ``float`` that is not a ``bool`` (NaN and infinities included)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require(ok: bool, name: str, allowed: str, value: Any, error: type[Exception] = ValueError) -> None:
    """Raise ``error("<name> must be <allowed>, got <value!r>")`` unless ``ok``."""
    if not ok:
        raise error(f"{name} must be {allowed}, got {value!r}")


def positive_int(
    name: str, value: Any, *, allowed: str = "an integer >= 1", error: type[Exception] = ValueError
) -> int:
    """``value`` if it is an int >= 1. ``allowed`` words the message (models say "a positive int")."""
    require(is_int(value) and value >= 1, name, allowed, value, error)
    return value


def non_negative_int(name: str, value: Any, *, error: type[Exception] = ValueError) -> int:
    """``value`` if it is an int >= 0."""
    require(is_int(value) and value >= 0, name, "an integer >= 0", value, error)
    return value


def positive_number(
    name: str, value: Any, *, allowed: str = "a number > 0", error: type[Exception] = ValueError
) -> float:
    """``value`` if it is a number > 0 (NaN is not)."""
    require(is_number(value) and value > 0, name, allowed, value, error)
    return value


def non_negative_number(name: str, value: Any, *, error: type[Exception] = ValueError) -> float:
    """``value`` if it is a number >= 0 (NaN is not)."""
    require(is_number(value) and value >= 0, name, "a number >= 0", value, error)
    return value
