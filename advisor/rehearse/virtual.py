"""A virtual CUDA device on a CPU-only torch: tensors with a shape, a dtype and a device, and no data.

Why not ``torch._subclasses.fake_tensor.FakeTensorMode``, which creates ``cuda:0`` tensors on a CPU
build? Tried with torch 2.13 (issue 28): its device is a Python attribute, so diffusers' group
offloading (``param.data = moved``) leaves it stale; ``Module.to`` swaps fake parameters and fails
on the weak references the mode keeps of every tensor it makes; ``pin_memory`` is not implemented;
and a storage has no device of its own to account bytes to. Here a `VirtualTensor` is a wrapper
subclass whose device lives in the C++ tensor (so ``.data =`` moves it, as on a GPU) over a `Block`,
the allocation it views (bytes, device, pinned); every op runs on the meta device for its shapes.
`VirtualCuda`, a dispatch mode, is the device: it refuses an op that mixes devices as CUDA would
(`DeviceMismatch`), logs every allocation and free per device (`Ledger`), and names what it can't
run (`NotRehearsable`: an op that needs the data, such as ``.item()``). While it is active,
``torch.cuda`` answers as a card of the given size would (streams and events that order nothing:
there is no data to race).

The device is entered with `advisor.rehearse.device.virtual_cuda`, which also installs what sits
around it: `advisor.rehearse.bindings` (the Python-level rewrites a CPU build needs for cuda
tensors) and `advisor.rehearse.runtime` (``torch.cuda`` answering as the card).
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from advisor.plan.allocator import EMPTY_CACHE, PHASE_START


CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
aten = torch.ops.aten

# Ops that move or relabel data between devices: the only ones that may see two devices at once.
_CROSS_DEVICE = {aten._to_copy.default, aten.copy_.default, aten._pin_memory.default}
# Ops whose CUDA kernels take one floating dtype for all their tensors.
_SAME_DTYPE = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm, aten.convolution}
# Ops whose answer is the data itself: no shape-only run can give it.
_NEEDS_DATA = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default, aten.nonzero.default}


class RehearsalError(Exception):
    """The rehearsal stopped: `DeviceMismatch` (the config would crash on the card) or `NotRehearsable`."""


class DeviceMismatch(RehearsalError):
    """An op mixes devices (or a weight's dtype with its input's), as a CUDA run would refuse it."""


class NotRehearsable(RehearsalError):
    """An op the virtual device can't run without data (or with no meta kernel): not a verdict on the config."""


@dataclass(eq=False)
class Block:
    """One allocation: what every tensor viewing it shares. Freed (in the ledger) when the last goes."""

    nbytes: int
    device: torch.device
    pinned: bool = False
    origin: str = ""  # what created it: a config step, the loading, or a phase (the hooks while running)
    id: int = field(default_factory=itertools.count().__next__)

    @property
    def pool(self) -> str:
        """Where its bytes count: ``cuda:0``, ``cpu`` (pageable) or ``cpu-pinned``."""
        return "cpu-pinned" if self.pinned else str(self.device)


@dataclass(frozen=True)
class Event:
    """One line of the ledger: an allocation (+bytes) or a free (-bytes) of a block in a pool, during a
    phase, on a stream (0: the default stream); or, with no block, a phase starting or
    ``torch.cuda.empty_cache()`` (`PHASE_START`, `EMPTY_CACHE`): what the allocator model replays."""

    block: int
    pool: str
    bytes: int
    phase: str
    stream: int = 0


class Ledger:
    """Every allocation and free per pool, in order; live and peak bytes per pool and per phase."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.live: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.phase_peaks: dict[str, dict[str, int]] = {}
        self.phase = "build"
        self.origin = ""  # what new blocks are created by (see `Block.origin`)
        self.stream = 0  # the stream new blocks are allocated on (``torch.cuda.stream(...)``)

    def allocate(self, block: Block) -> None:
        weakref.finalize(block, self._record, block.id, block.pool, -block.nbytes, self.stream)
        self._record(block.id, block.pool, block.nbytes, self.stream)

    def _record(self, block: int, pool: str, nbytes: int, stream: int) -> None:
        self.events.append(Event(block, pool, nbytes, self.phase, stream))
        live = self.live[pool] = self.live.get(pool, 0) + nbytes
        self.peak[pool] = max(self.peak.get(pool, 0), live)
        peaks = self.phase_peaks.setdefault(self.phase, {})
        peaks[pool] = max(peaks.get(pool, 0), live)

    def enter(self, phase: str) -> None:
        """Start a phase: its peak starts from what is live now."""
        self.phase = phase
        self.phase_peaks[phase] = dict(self.live)
        self.events.append(Event(PHASE_START, "", 0, phase))

    def empty_cache(self) -> None:
        """``torch.cuda.empty_cache()`` was called: the allocator gives its whole cached segments back."""
        self.events.append(Event(EMPTY_CACHE, str(CUDA), 0, self.phase))


class VirtualTensor(torch.Tensor):
    """A tensor with no data: shape, strides, dtype and device, viewing one `Block`."""

    block: Block

    @staticmethod
    def __new__(
        cls,
        meta: torch.Tensor,
        device: torch.device | None = None,
        block: Block | None = None,
        requires_grad: bool = False,
        **_attributes: Any,
    ) -> torch.Tensor:
        if device is None:  # called as a weight's class: ``type(param)(value, **param.__dict__)`` (accelerate)
            real = next(c for c in cls.__mro__ if not issubclass(c, VirtualTensor))  # Parameter, Params4bit, ...
            if real is torch.Tensor:
                real = torch.nn.Parameter
            attributes = {k: v for k, v in _attributes.items() if k not in ("block", "_is_param")}
            return real(meta, requires_grad=requires_grad, **attributes)
        tensor = torch.Tensor._make_wrapper_subclass(  # type: ignore[attr-defined]
            cls,
            meta.size(),
            meta.stride(),
            storage_offset=meta.storage_offset(),
            dtype=meta.dtype,
            device=device,
            requires_grad=False,
        )
        tensor.block = block
        return tensor

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"VirtualTensor({list(self.shape)}, {self.dtype}, {self.device})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        # Reached where torch runs an op with the modes set aside (``Tensor._make_subclass``, which
        # bitsandbytes' Params4bit uses): the active virtual device still runs it.
        if not _ACTIVE:
            raise RuntimeError(f"{func} on a virtual tensor outside the virtual device (`virtual_cuda`)")
        return _ACTIVE[-1].__torch_dispatch__(func, types, args, kwargs)


def _on_meta(func, args, kwargs):  # noqa: ANN001, ANN202
    """Run `func` on meta tensors. A library op whose output size depends on the data (bitsandbytes'
    LLM.int8 outlier columns) asks its fake kernel's context for a size, which meta kernels refuse:
    it runs its fake kernel here with every such size 0 (no outlier columns: a few columns of a
    matrix at most, so no bytes that matter; the devices are checked all the same)."""
    if func.namespace == "aten":
        return func(*args, **kwargs)
    from torch._library import fake_impl
    from torch._library.simple_registry import singleton

    kernel = singleton.find(func.name()).fake_impl.kernel
    if kernel is None:
        return func(*args, **kwargs)
    with fake_impl.set_ctx_getter(lambda: _NoDataSizes()):
        return kernel(*args, **kwargs)


class _NoDataSizes:
    def new_dynamic_size(self, *, min: int = 0, max: int | None = None) -> int:  # noqa: A002
        return min


def _dispatches_itself(tensor: torch.Tensor) -> bool:
    cls = type(tensor)
    return not issubclass(cls, VirtualTensor) and cls.__torch_dispatch__ is not torch.Tensor.__torch_dispatch__


def meta_of(tensor: torch.Tensor) -> torch.Tensor:
    """A meta tensor of `tensor`'s geometry (for a virtual tensor: what its ops compute on)."""
    return torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device="meta")


def device_of(value: Any) -> torch.device | None:
    if value is None:
        return None
    device = torch.device(value)
    return CUDA if device.type == "cuda" and device.index is None else device


def describe(tensor: torch.Tensor) -> str:
    return f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)} on {tensor.device}"


class VirtualCuda(TorchDispatchMode):
    """The virtual device: runs every op on meta tensors, checks devices, and keeps the `Ledger`.

    `describe_tensor` names a tensor in a mismatch (a weight's qualified name, say); `where` names
    the module running (the innermost forward).
    """

    def __init__(
        self,
        ledger: Ledger,
        describe_tensor: Callable[[torch.Tensor], str] = describe,
        where: Callable[[], str] = lambda: "",
    ) -> None:
        super().__init__()
        self.ledger = ledger
        self.describe_tensor = describe_tensor
        self.where = where

    def new(self, meta: torch.Tensor, device: torch.device, pinned: bool = False) -> VirtualTensor:
        block = Block(meta.untyped_storage().nbytes(), device, pinned, self.ledger.origin)
        self.ledger.allocate(block)
        return VirtualTensor(meta, device, block)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if any(_dispatches_itself(t) for t in tensors):
            # A tensor subclass of a library (torchao's quantized weights) runs the op on its inner
            # tensors, which are virtual: each of their ops comes back here.
            return NotImplemented
        if func in _NEEDS_DATA:
            raise NotRehearsable(f"{func.overloadpacket.__name__} needs the tensor's values{self._at()}")
        if func is aten.is_pinned.default:
            return isinstance(args[0], VirtualTensor) and args[0].block.pinned
        if func in (aten._pin_memory.default, aten.pin_memory.default):  # a page-locked copy
            return self.new(meta_of(args[0]), CPU, pinned=True)
        if func not in _CROSS_DEVICE:
            self._check_devices(func, tensors)
        if func.overloadpacket in _SAME_DTYPE:
            self._check_dtypes(func, tensors)

        def to_meta(t: Any) -> Any:
            return (
                meta_of(t)
                if isinstance(t, VirtualTensor) or (isinstance(t, torch.Tensor) and t.device.type != "meta")
                else t
            )

        meta_args, meta_kwargs = tree_map(to_meta, (args, kwargs))
        if "device" in meta_kwargs:
            meta_kwargs["device"] = "meta"
        try:
            out = _on_meta(func, meta_args, meta_kwargs)
        except NotImplementedError as error:
            raise NotRehearsable(
                f"{func.overloadpacket.__name__} has no shape-only kernel{self._at()}: {error}"
            ) from None
        return self._wrap(func, args, kwargs, tensors, out)

    def _wrap(self, func, args, kwargs, tensors, out):  # noqa: ANN001, ANN202
        device = device_of(kwargs.get("device"))
        if device is None:
            on_device = [t.device for t in tensors if t.dim() > 0 and t.device.type != "meta"]
            device = on_device[0] if on_device else (tensors[0].device if tensors else CPU)
            if func is aten.copy_.default:
                device = args[0].device
        if device.type == "meta":  # building on meta (before weights load) is left to meta
            return out
        pinned = bool(kwargs.get("pin_memory"))
        returns = func._schema.returns
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        wrapped = []
        for position, value in enumerate(outputs):
            alias = returns[min(position, len(returns) - 1)].alias_info if returns else None
            if not isinstance(value, torch.Tensor):
                wrapped.append(value)
            elif alias is not None and alias.is_write:  # in place, or out=: the argument itself
                wrapped.append(self._argument_aliased(func, args, kwargs, alias))
            elif alias is not None and hasattr(args[0], "block"):  # a view of its input
                wrapped.append(VirtualTensor(value, device, args[0].block))
            else:
                wrapped.append(self.new(value, device, pinned))
        if isinstance(out, (tuple, list)):
            return type(out)(wrapped)
        return wrapped[0]

    @staticmethod
    def _argument_aliased(func, args, kwargs, alias) -> Any:  # noqa: ANN001
        """The argument an in-place or ``out=`` result is (the schema marks both alike: ``Tensor(a!)``)."""
        given = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
        for argument in func._schema.arguments:
            if argument.alias_info is not None and argument.alias_info.before_set == alias.before_set:
                return given.get(argument.name, args[0])
        return args[0]

    def _check_devices(self, func, tensors: list[torch.Tensor]) -> None:  # noqa: ANN001
        # CUDA kernels take CPU scalars (0-dim tensors) beside device tensors; nothing else mixes.
        devices = {t.device for t in tensors if t.dim() > 0 or t.device.type != "cpu"}
        devices.discard(torch.device("meta"))
        if len(devices) > 1:
            named = "; ".join(dict.fromkeys(self.describe_tensor(t) for t in tensors if t.dim() > 0))
            raise DeviceMismatch(
                f"{func.overloadpacket.__name__} mixes {' and '.join(sorted(map(str, devices)))}{self._at()}: {named}"
            )

    def _check_dtypes(self, func, tensors: list[torch.Tensor]) -> None:  # noqa: ANN001
        # CUDA's matmul and convolution kernels take one floating dtype ("expected mat1 and mat2 to
        # have the same dtype"); their meta kernels don't check it.
        dtypes = {t.dtype for t in tensors if t.is_floating_point() and t.dim() > 0}
        if len(dtypes) > 1:
            named = "; ".join(dict.fromkeys(self.describe_tensor(t) for t in tensors if t.dim() > 0))
            kinds = " and ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
            raise DeviceMismatch(f"{func.overloadpacket.__name__} mixes {kinds}{self._at()}: {named}")

    def _at(self) -> str:
        where = self.where()
        return f" in {where}" if where else ""


_ACTIVE: list[VirtualCuda] = []  # the virtual devices entered (`advisor.rehearse.device`), innermost last
