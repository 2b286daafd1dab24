"""Flat storage: every unit's tensors as consecutive slices of one buffer per dtype and device.

Why: DreamDDP averages parameters *in place*. If the tensors of several units had to be
copied into a flat buffer to be coalesced into one all-reduce, every iteration would hold a
copy of everything it sends until the end of backward — extra memory the method promises not
to need. Laying the parameters (and floating buffers) out once, in backward order, in one
flat buffer makes any run of units that are adjacent in backward order a *view* of that
buffer: one all-reduce, in place, no copy. The parameters stay the same ``nn.Parameter``
objects (optimizers keep working); only their ``.data`` now points into the flat buffer.

Anything that later replaces a parameter's storage (``model.to()``, ``load_state_dict(...,
assign=True)``) is detected by ``intact()``, and the wrapper lays the storage out again.
"""

from __future__ import annotations

import torch
from torch import nn

from dreamddp.core.buckets import Segment  # here: a slice [start, end), in elements, of flat buffer ``key``
from dreamddp.core.units import SyncUnit

__all__ = ["FlatLayout", "Segment"]


class FlatLayout:
    """Lay ``units`` out in ``order`` (unit indices), rebinding parameters and buffers to views."""

    def __init__(self, module: nn.Module, units: list[SyncUnit], order: list[int]) -> None:
        keys: dict[tuple[torch.dtype, torch.device], int] = {}
        placements: list[tuple[int, int, torch.Tensor, _Rebind]] = []  # (unit, key, tensor, rebind)
        sizes: list[int] = []
        for unit_id in order:
            unit = units[unit_id]
            items: list[tuple[torch.Tensor, _Rebind]] = [
                (p.data, _ParamRebind(module, n, p)) for p, n in zip(unit.params, unit.param_names)
            ]
            items += [(b, _BufferRebind(module, n)) for b, n in zip(unit.buffers, unit.buffer_names)]
            for tensor, rebind in items:
                key = keys.setdefault((tensor.dtype, tensor.device), len(keys))
                if key == len(sizes):
                    sizes.append(0)
                placements.append((unit_id, key, tensor, rebind))
                sizes[key] += tensor.numel()
        self.flats: list[torch.Tensor] = [
            torch.empty(n, dtype=dtype, device=device) for (dtype, device), n in zip(keys, sizes)
        ]
        offsets = [0] * len(self.flats)
        segments: dict[int, list[Segment]] = {i: [] for i in order}
        self._bound: list[tuple[_Rebind, int]] = []
        with torch.no_grad():
            for unit_id, key, tensor, rebind in placements:
                start = offsets[key]
                end = start + tensor.numel()
                view = self.flats[key][start:end].view(tensor.shape)
                view.copy_(tensor)
                rebind.bind(view)
                self._bound.append((rebind, view.data_ptr()))
                offsets[key] = end
                previous = segments[unit_id][-1] if segments[unit_id] else None
                if previous is not None and previous.key == key and previous.end == start:
                    segments[unit_id][-1] = Segment(unit_id, key, previous.start, end)
                else:
                    segments[unit_id].append(Segment(unit_id, key, start, end))
        self.segments = segments  # unit id -> its slices, in layout order

    def intact(self) -> bool:
        """False once anything has moved a parameter's or buffer's data out of the flat storage.

        Raises if a parameter *object* was replaced (``load_state_dict(assign=True)``): the
        wrapper's hooks are on the old one, so it must be built again.
        """
        return all(rebind.current_ptr() == ptr for rebind, ptr in self._bound)

    def view(self, key: int, start: int, end: int) -> torch.Tensor:
        return self.flats[key][start:end]

    def chunks(self, cap_elements_of: dict[int, int]) -> list[torch.Tensor]:
        """The whole storage as in-place views of at most ``cap_elements_of[key]`` elements."""
        out: list[torch.Tensor] = []
        for key, flat in enumerate(self.flats):
            step = max(1, cap_elements_of[key])
            out.extend(flat[i : i + step] for i in range(0, flat.numel(), step))
        return out


class _Rebind:
    def bind(self, view: torch.Tensor) -> None:
        raise NotImplementedError

    def current_ptr(self) -> int:
        raise NotImplementedError


class _ParamRebind(_Rebind):
    def __init__(self, root: nn.Module, qualified_name: str, param: nn.Parameter) -> None:
        owner_path, _, self.name = qualified_name.rpartition(".")
        self.qualified_name = qualified_name
        self.owner = root.get_submodule(owner_path) if owner_path else root
        self.param = param

    def bind(self, view: torch.Tensor) -> None:
        self.param.data = view

    def current_ptr(self) -> int:
        if self.owner._parameters.get(self.name) is not self.param:
            raise RuntimeError(
                f"parameter {self.qualified_name!r} was replaced by a new object after DreamDDP was built "
                "(e.g. load_state_dict(assign=True)); load without assign=True, or build DreamDDP again"
            )
        return self.param.data_ptr()


class _BufferRebind(_Rebind):
    """Buffers are replaced in their owning module's ``_buffers`` (BatchNorm updates in place)."""

    def __init__(self, root: nn.Module, qualified_name: str) -> None:
        owner_path, _, self.name = qualified_name.rpartition(".")
        self.owner = root.get_submodule(owner_path) if owner_path else root

    def bind(self, view: torch.Tensor) -> None:
        self.owner._buffers[self.name] = view

    def current_ptr(self) -> int:
        buffer = self.owner._buffers.get(self.name)
        return -1 if buffer is None else buffer.data_ptr()
