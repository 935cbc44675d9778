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

Two gaps of a CPU build are closed at the Python level, in `_DeviceNames`: an index-less ``"cuda"``
(``x.to("cuda")``, ``x.cuda()``) asks the CUDA runtime for its current device, and Python indexing
of a cuda tensor takes a CUDA device guard; both are rewritten before they reach C++.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map


CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
aten = torch.ops.aten

# Ops that move or relabel data between devices: the only ones that may see two devices at once.
_CROSS_DEVICE = {aten._to_copy.default, aten.copy_.default, aten._pin_memory.default}
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
    """One line of the ledger: an allocation (+bytes) or a free (-bytes) in a pool, during a phase."""

    block: int
    pool: str
    bytes: int
    phase: str


class Ledger:
    """Every allocation and free per pool, in order; live and peak bytes per pool and per phase."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.live: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.phase_peaks: dict[str, dict[str, int]] = {}
        self.phase = "build"
        self.origin = ""  # what new blocks are created by (see `Block.origin`)

    def allocate(self, block: Block) -> None:
        weakref.finalize(block, self._free, block.id, block.pool, block.nbytes)
        self._record(block.id, block.pool, block.nbytes)

    def _free(self, block: int, pool: str, nbytes: int) -> None:
        self._record(block, pool, -nbytes)

    def _record(self, block: int, pool: str, nbytes: int) -> None:
        self.events.append(Event(block, pool, nbytes, self.phase))
        live = self.live[pool] = self.live.get(pool, 0) + nbytes
        self.peak[pool] = max(self.peak.get(pool, 0), live)
        peaks = self.phase_peaks.setdefault(self.phase, {})
        peaks[pool] = max(peaks.get(pool, 0), live)

    def enter(self, phase: str) -> None:
        """Start a phase: its peak starts from what is live now."""
        self.phase = phase
        self.phase_peaks[phase] = dict(self.live)


class VirtualTensor(torch.Tensor):
    """A tensor with no data: shape, strides, dtype and device, viewing one `Block`."""

    block: Block

    @staticmethod
    def __new__(
        cls, meta: torch.Tensor, device: torch.device | None = None, block: Block | None = None, **parameter: Any
    ) -> torch.Tensor:
        if device is None:  # called as a weight's class, as ``type(param)(value, requires_grad=...)`` (accelerate)
            return torch.nn.Parameter(meta, **parameter)
        tensor = torch.Tensor._make_wrapper_subclass(
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
        raise RuntimeError(f"{func} on a virtual tensor outside the virtual device (`VirtualCuda`)")


def meta_of(tensor: torch.Tensor) -> torch.Tensor:
    """A meta tensor of `tensor`'s geometry (for a virtual tensor: what its ops compute on)."""
    return torch.empty_strided(tensor.size(), tensor.stride(), dtype=tensor.dtype, device="meta")


def _device(value: Any) -> torch.device | None:
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
        if func in _NEEDS_DATA:
            raise NotRehearsable(f"{func.overloadpacket.__name__} needs the tensor's values{self._at()}")
        if func is aten.is_pinned.default:
            return isinstance(args[0], VirtualTensor) and args[0].block.pinned
        if func is aten._pin_memory.default:  # a page-locked copy
            return self.new(meta_of(args[0]), CPU, pinned=True)
        if func not in _CROSS_DEVICE:
            self._check_devices(func, tensors)

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
            out = func(*meta_args, **meta_kwargs)
        except NotImplementedError as error:
            raise NotRehearsable(
                f"{func.overloadpacket.__name__} has no shape-only kernel{self._at()}: {error}"
            ) from None
        return self._wrap(func, args, kwargs, tensors, out)

    def _wrap(self, func, args, kwargs, tensors, out):  # noqa: ANN001, ANN202
        device = _device(kwargs.get("device"))
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
            elif alias is not None and isinstance(args[0], VirtualTensor):  # a view of its input
                wrapped.append(VirtualTensor(value, device, args[0].block))
            else:
                wrapped.append(self.new(value, device, pinned))
        if isinstance(out, (tuple, list)):
            return type(out)(wrapped)
        return wrapped[0]

    @staticmethod
    def _argument_aliased(func, args, kwargs, alias) -> Any:  # noqa: ANN001
        for argument, value in zip(
            func._schema.arguments, [*args, *[kwargs.get(a.name) for a in func._schema.arguments[len(args) :]]]
        ):
            if argument.alias_info is not None and argument.alias_info.before_set == alias.before_set:
                return value
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

    def _at(self) -> str:
        where = self.where()
        return f" in {where}" if where else ""


class _DeviceNames(TorchFunctionMode):
    """Rewrites, before C++ sees them, what a CPU build can't run for a cuda tensor: ``"cuda"``
    without an index becomes ``cuda:0``; ``x.cuda()`` becomes ``x.to("cuda:0")``; the bindings that
    take a CUDA device guard (indexing, ``contiguous``) run on a cpu-labelled alias of the same
    block and are labelled back; ``torch.tensor(data, device="cuda")`` is made on the cpu and moved;
    ``x.data = y`` moves the block with the device."""

    def __init__(self, capability: tuple[int, int]) -> None:
        super().__init__()
        self.capability = capability

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        kwargs = kwargs or {}
        if (
            func is torch.nn.functional.scaled_dot_product_attention
            and (args or [kwargs.get("query")])[0].device.type == "cuda"
        ):
            return _attention(self.capability, *args, **kwargs)
        if func is torch.device:  # `torch.device("cuda", 0)`: its own index; an index-less one is named where used
            return func(*args, **kwargs)
        args, kwargs = tree_map(_named_device, (args, kwargs))
        if func is torch.Tensor.record_stream:  # our streams are stand-ins; the allocator keeps the block for it
            return None
        if func is torch.Tensor.cuda:
            return args[0].to(CUDA, non_blocking=kwargs.get("non_blocking", False))
        if func in _GUARDED and isinstance(args[0], VirtualTensor) and args[0].device.type == "cuda":
            return _relabel(func(*_relabel(args, CPU), **_relabel(kwargs, CPU)), CUDA)
        if func in (torch.tensor, torch.as_tensor) and _device(kwargs.get("device")) == CUDA:
            return func(*args, **{**kwargs, "device": CPU}).to(CUDA)
        if getattr(func, "__self__", None) is _DATA and func.__name__ == "__set__":  # `x.data = y`
            func(*args)
            if isinstance(args[1], VirtualTensor):
                args[0].block = args[1].block  # x now views y's block (C++ already took its device)
            return None
        return func(*args, **kwargs)


def _attention(
    capability: tuple[int, int],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` as CUDA runs it: the first kernel of torch's priority order
    (``torch._C._get_sdp_priority_order()``: flash, memory-efficient, math) whose checks pass, after
    ``aten/src/ATen/native/transformers/cuda/sdp_utils.cpp``: flash needs sm80+, fp16/bf16, no mask
    and a head size up to 256; memory-efficient takes masks and fp32 from sm50. On the CPU build
    the op itself would decompose to the math kernel, whose score matrix a GPU run never holds."""
    four_d = query.dim() == key.dim() == value.dim() == 4 and query.shape[-1] == key.shape[-1] == value.shape[-1]
    grouped = four_d and query.shape[1] != key.shape[1]
    if four_d and not grouped:
        half = query.dtype in (torch.float16, torch.bfloat16)
        if capability >= (8, 0) and half and attn_mask is None and query.shape[-1] <= 256:
            return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[0]
        if capability >= (5, 0):
            if attn_mask is not None and attn_mask.dtype == torch.bool:  # as SDPA turns it into a bias
                attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
            return aten._scaled_dot_product_efficient_attention(
                query, key, value, attn_mask, False, dropout_p, is_causal, scale=scale
            )[0]
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )


def _relabel(value: Any, device: torch.device) -> Any:
    """`value` with every virtual tensor of another device replaced by an alias labelled `device`."""

    def one(tensor: Any) -> Any:
        if isinstance(tensor, VirtualTensor) and tensor.device != device:
            return VirtualTensor(meta_of(tensor), device, tensor.block)
        return tensor

    return tree_map(one, value)


# Python bindings that take a device guard of their tensor's device before dispatching (a CPU build
# has none for CUDA: "PyTorch is not linked with support for cuda devices").
_GUARDED = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.contiguous}


_DATA = torch._C.TensorBase.__dict__["data"]


def _named_device(value: Any) -> Any:
    if isinstance(value, str) and value == "cuda":
        return "cuda:0"
    if isinstance(value, torch.device) and value.type == "cuda" and value.index is None:
        return CUDA
    return value


# --- torch.cuda, as a card of `total_bytes` would answer -----------------------------------------


class _Stream(torch.Stream):
    """A CUDA stream that orders nothing: without data there is nothing to race. A `torch.Stream`
    (a CPU one underneath) so that C++ bindings taking a stream accept it."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stream:
        return super().__new__(cls, device="cpu")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event or _Event()

    def query(self) -> bool:
        return True


class _Event(_Stream):
    def record(self, stream: Any = None) -> None:
        pass

    def elapsed_time(self, other: Any) -> float:
        return 0.0


@dataclass(frozen=True)
class _Properties:
    name: str
    total_memory: int
    major: int = 9
    minor: int = 0
    multi_processor_count: int = 132


@contextlib.contextmanager
def cuda_runtime(ledger: Ledger, name: str, total_bytes: int, capability: tuple[int, int]) -> Iterator[None]:
    """``torch.cuda`` (and ``torch.accelerator``) answering as one card: available, one device, its
    name and memory, the ledger's allocated bytes; streams and events that order nothing."""
    stream = _Stream()
    allocated = lambda device=None: ledger.live.get("cuda:0", 0)  # noqa: E731
    replacements: dict[tuple[Any, str], Any] = {
        (torch.cuda, "is_available"): lambda: True,
        (torch.cuda, "is_initialized"): lambda: True,
        (torch.cuda, "_lazy_init"): lambda: None,
        (torch.cuda, "device_count"): lambda: 1,
        (torch.cuda, "current_device"): lambda: 0,
        (torch.cuda, "set_device"): lambda device: None,
        (torch.cuda, "get_device_name"): lambda device=None: name,
        (torch.cuda, "get_device_capability"): lambda device=None: capability,
        (torch.cuda, "get_device_properties"): lambda device=None: _Properties(name, total_bytes, *capability),
        (torch.cuda, "mem_get_info"): lambda device=None: (total_bytes - allocated(), total_bytes),
        (torch.cuda, "memory_allocated"): allocated,
        (torch.cuda, "memory_reserved"): allocated,
        (torch.cuda, "max_memory_allocated"): lambda device=None: ledger.peak.get("cuda:0", 0),
        (torch.cuda, "reset_peak_memory_stats"): lambda device=None: None,
        (torch.cuda, "synchronize"): lambda device=None: None,
        (torch.cuda, "empty_cache"): lambda: ledger.events.append(Event(-1, "cuda:0", 0, ledger.phase)),
        (torch.cuda, "Stream"): _Stream,
        (torch.cuda, "Event"): _Event,
        (torch.cuda, "current_stream"): lambda device=None: stream,
        (torch.cuda, "default_stream"): lambda device=None: stream,
        (torch.cuda, "stream"): lambda s=None: contextlib.nullcontext(s),
        (torch.accelerator, "is_available"): lambda: True,
        (torch.accelerator, "current_accelerator"): lambda check_available=False: CUDA,
        (torch.accelerator, "device_count"): lambda: 1,
    }
    saved = {key: getattr(*key) for key in replacements}
    try:
        for (module, attribute), value in replacements.items():
            setattr(module, attribute, value)
        yield
    finally:
        for (module, attribute), value in saved.items():
            setattr(module, attribute, value)


@contextlib.contextmanager
def virtual_cuda(
    ledger: Ledger,
    *,
    name: str = "virtual GPU",
    total_bytes: int = 80 * 2**30,
    capability: tuple[int, int] = (9, 0),
    describe_tensor: Callable[[torch.Tensor], str] = describe,
    where: Callable[[], str] = lambda: "",
) -> Iterator[VirtualCuda]:
    """Everything that runs inside computes shapes only, on ``cpu`` and a virtual ``cuda:0``.

    >>> with virtual_cuda(Ledger()) as device:  # doctest: +SKIP
    ...     x = torch.empty(4, 8, device="cuda")
    """
    # A CPU build has no CUDA device guard; torch's fake tensors install a no-op one the same way.
    torch._C._ensureCUDADeviceGuardSet()
    mode = VirtualCuda(ledger, describe_tensor, where)
    with cuda_runtime(ledger, name, total_bytes, capability), torch.no_grad(), mode, _DeviceNames(capability):
        yield mode
