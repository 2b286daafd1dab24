"""Refusing models whose forward reads a unit's weights where ``overlap="forward"`` cannot land them.

With ``overlap="forward"`` a unit's average is still in flight when backward returns; it lands
in a forward pre-hook of each module that owns one of the unit's tensors (``Landing``), and
``DreamDDP.forward`` lands the rest after the model's forward returns. A parent that reads a
child's weight functionally — ``F.linear(x, self.child.weight)``, as ``nn.MultiheadAttention``
does with ``out_proj.weight`` — with no owner's forward run before the read, therefore reads
the weight before its average lands: the run silently trains a different model.

``ForwardReads`` watches one forward and refuses such a model: forward hooks record which
modules' forwards have started (and so which units have landed) and which module is running;
a ``TorchFunctionMode`` sees every torch call, and a call that receives a unit's parameter or
buffer before any module owning that tensor has started its forward is a stale read. A read
after the owner's forward (a tied head written as ``x @ self.wte.weight.T`` after
``self.wte(idx)``) is exact — the unit landed in the owner's pre-hook — and is allowed.
Calls made by forward pre-hooks (the landing itself, held-back optimizer steps) are not reads
of the forward. Everything is removed when the forward ends; the error is raised after that.
The check is structural (it does not depend on what is in flight), so checking the first
training forwards is enough and later ones cost nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from dreamddp.core.state import SyncState

__all__ = ["FORWARDS_CHECKED", "ForwardReads"]

logger = logging.getLogger(__name__)

# Training forwards checked: the first may take a one-off path (state or caches built on the
# first call); the second is the path every later iteration takes.
FORWARDS_CHECKED = 2

# Tensor methods and properties that read metadata, not values: harmless on a stale tensor.
_METADATA = frozenset(
    {
        "shape", "dtype", "device", "layout", "requires_grad", "is_leaf", "grad", "grad_fn", "ndim",
        "names", "is_cuda", "is_cpu", "is_meta", "is_nested", "is_sparse", "is_quantized", "is_mkldnn",
        "itemsize", "nbytes", "_version", "size", "dim", "ndimension", "numel", "nelement", "stride",
        "element_size", "is_floating_point", "is_complex", "is_contiguous", "get_device", "data_ptr",
        "storage_offset", "__len__", "__hash__",
    }
)  # fmt: skip


def _name_of(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property: the descriptor's name
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return str(name)


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


class _Reads(TorchFunctionMode):
    def __init__(self, check: ForwardReads) -> None:
        super().__init__()
        self.check = check

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        self.check.saw(func, args, kwargs)
        return func(*args, **kwargs)


class ForwardReads:
    """Context manager around one forward of ``state.module``: raises ``ValueError`` on exit
    if the forward read a unit's tensor before any module owning it had started its forward."""

    def __init__(self, state: SyncState) -> None:
        self.module = state.module
        units = state.units
        self.unit_of = {id(t): i for i, u in enumerate(units) for t in (*u.params, *u.buffers)}
        self.tensor_name = {
            id(t): n for u in units for t, n in zip((*u.params, *u.buffers), (*u.param_names, *u.buffer_names))
        }
        self.buffer_ids = {id(b) for u in units for b in u.buffers}
        self.names = {m: name or "<root>" for name, m in self.module.named_modules()}
        self.running: list[nn.Module] = []
        self.landed: set[int] = set()  # units some owner's forward has started (so they landed)
        self.in_pre_hooks = 0
        self.stale: dict[int, str] = {}  # tensor id -> the module whose forward read it, first read
        self._handles: list[RemovableHandle] = []
        self._mode = _Reads(self)

    def _owned_units(self, module: nn.Module) -> frozenset[int]:
        return frozenset(self.unit_of[id(t)] for t in _own(module) if t is not None and id(t) in self.unit_of)

    # ------------------------------------------------------------------ what is seen
    def saw(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.in_pre_hooks or _name_of(func) in _METADATA:
            return
        for t in _tensors((args, kwargs)):
            unit = self.unit_of.get(id(t))
            if unit is not None and unit not in self.landed and id(t) not in self.stale:
                self.stale[id(t)] = self.names.get(self.running[-1], "?") if self.running else "<root>"

    # -------------------------------------------------------------------- install
    def __enter__(self) -> ForwardReads:
        for module in self.module.modules():
            units = self._owned_units(module)

            # Runs before every other pre-hook (the landing's): from here the module's units land.
            def enter(mod: nn.Module, _args: Any, units: frozenset[int] = units) -> None:
                self.in_pre_hooks += 1
                self.running.append(mod)
                self.landed |= units

            # Registered after the landing's pre-hooks: the module's own forward starts.
            def started(_mod: nn.Module, _args: Any) -> None:
                self.in_pre_hooks -= 1

            def finished(mod: nn.Module, _args: Any, _out: Any) -> None:
                if self.running and self.running[-1] is mod:
                    self.running.pop()

            self._handles += [
                module.register_forward_pre_hook(enter, prepend=True),
                module.register_forward_pre_hook(started),
                module.register_forward_hook(finished, always_call=True),
            ]
        self._mode.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._mode.__exit__(exc_type, exc, tb)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if exc_type is not None:
            return
        if self.stale:
            raise ValueError(self._message())
        logger.debug("overlap='forward': no unit is read before its owner's forward (%d modules)", len(self.names))

    def _message(self) -> str:
        (first, reader), *others = self.stale.items()
        kind = "buffer" if first in self.buffer_ids else "parameter"
        owners = ", ".join(repr(n) for m, n in self.names.items() if any(id(t) == first for t in _own(m)))
        also = ", ".join(repr(self.tensor_name[t]) for t, _ in others[:3]) + (", ..." if len(others) > 3 else "")
        return (
            f'overlap="forward" cannot keep {kind} {self.tensor_name[first]!r} exact: the forward of {reader!r} '
            f"reads it before the forward of any module that owns it ({owners}), so its average would land "
            f"after the read{f' (also read early: {also})' if others else ''}; "
            'use overlap="backward", or call the owning module instead of reading its weight'
        )


def _own(module: nn.Module) -> tuple[torch.Tensor | None, ...]:
    """The tensors ``module`` holds directly (the ones its landing pre-hook lands)."""
    return (*module._parameters.values(), *module._buffers.values())
