"""What a CPU build of torch can't do for a cuda tensor at the Python level, rewritten before C++ sees it.

Python bindings of some tensor methods take a CUDA device guard or ask the CUDA runtime for its
current device before they dispatch (a CPU build has neither: "PyTorch is not linked with support
for cuda devices"); a torch function mode sees the call first and rewrites it. Scaled dot-product
attention runs the kernel CUDA would choose, not the math kernel a CPU build decomposes it to.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from advisor.rehearse.virtual import CPU, CUDA, VirtualTensor, aten, device_of, meta_of


class DeviceNames(TorchFunctionMode):
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
        if func in (torch.tensor, torch.as_tensor) and device_of(kwargs.get("device")) == CUDA:
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
