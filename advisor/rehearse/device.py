"""Entering the virtual CUDA device: the dispatch mode, the Python-level rewrites and the runtime at once."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from advisor.rehearse.bindings import DeviceNames
from advisor.rehearse.runtime import cuda_runtime
from advisor.rehearse.virtual import _ACTIVE, Ledger, VirtualCuda, VirtualTensor, describe, meta_of


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
    _ACTIVE.append(mode)
    make_subclass, own = torch.Tensor._make_subclass, torch.Tensor.__dict__.get("_make_subclass")
    torch.Tensor._make_subclass = staticmethod(_make_virtual_subclass(make_subclass))
    try:
        with cuda_runtime(ledger, name, total_bytes, capability), torch.no_grad(), mode, DeviceNames(capability):
            yield mode
    finally:
        _ACTIVE.remove(mode)
        if own is None:
            del torch.Tensor._make_subclass  # the base class's own again
        else:
            torch.Tensor._make_subclass = own


_VIRTUAL_CLASSES: dict[type, type] = {}
# Parameter classes whose own ``__torch_function__`` the virtual one keeps (a wrapper subclass has it
# disabled): GGUF's carries each weight's ``quant_type`` to every op's result, ``.to()`` included
# (``GGUFParameter.__torch_function__``, diffusers/quantizers/gguf/utils.py).
_KEEP_TORCH_FUNCTION = frozenset({"GGUFParameter"})


def _make_virtual_subclass(make_subclass: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``Tensor._make_subclass(cls, data)`` for a virtual `data`: a virtual tensor that is also a
    `cls`. Quantized weights are Parameter subclasses made this way (bitsandbytes' ``Params4bit`` and
    ``Int8Params``); their methods (``to``, which quantizes, and their quantization state) then run
    as written, on a tensor without data."""

    def make(cls: type, data: torch.Tensor, requires_grad: bool = False, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not isinstance(data, VirtualTensor):
            return make_subclass(cls, data, requires_grad, *args, **kwargs)
        if cls not in _VIRTUAL_CLASSES:
            # The real class's name: libraries test it (accelerate's set_module_tensor_to_device checks
            # ``param_cls.__name__`` for "Params4bit" and "Int8Params").
            own = (
                {"__torch_function__": cls.__dict__["__torch_function__"]}
                if cls.__name__ in _KEEP_TORCH_FUNCTION
                else {}
            )
            _VIRTUAL_CLASSES[cls] = type(
                cls.__name__, (VirtualTensor, cls), {"__qualname__": f"virtual {cls.__name__}", **own}
            )
        return VirtualTensor.__new__(_VIRTUAL_CLASSES[cls], meta_of(data), data.device, data.block)

    return make
