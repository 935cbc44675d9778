"""Count what one call computes and holds: FLOPs by kind and the peak of live activation bytes.

`Counter` is a torch dispatch mode. It sees every aten op, so it works the same on the meta device
(full-size models, no weights, no memory) and on real CPU tensors (the tests' check against the
allocator). Two things it does beyond `torch.utils.flop_counter.FlopCounterMode`, whose FLOP
formulas it reuses:

* live bytes: every tensor storage an op creates is counted until Python frees it (a weakref
  finaliser on the storage); storages that existed before the call (weights, buffers, inputs) are
  not activations and never count. The peak is the largest sum seen after any op.
* allocations: every storage created and freed, in order (`Counter.events`), with a mark where a
  repeated block starts: the call's allocation pattern, which the caching-allocator model replays
  (`advisor.trace.pattern`, `advisor.plan.allocator`).
* attention: `scaled_dot_product_attention` is replaced, for the call, by a stand-in with the
  memory of the fused kernels CUDA runs (flash / memory-efficient: the output and a float32
  log-sum-exp, never the score matrix) and the FLOPs of the math. The largest score matrix of any
  call is recorded, so a plan for the math path (which does materialise it) can add it back.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry


# Ops that allocate without computing anything (their bytes are not memory traffic).
_FACTORIES = {
    torch.ops.aten.empty,
    torch.ops.aten.empty_strided,
    torch.ops.aten.empty_like,
    torch.ops.aten.zeros,
    torch.ops.aten.ones,
    torch.ops.aten.full,
}
_CONV = {torch.ops.aten.convolution, torch.ops.aten._convolution, torch.ops.aten.conv2d, torch.ops.aten.conv3d}
MARK = (0, 0)  # an event that is no allocation: a repeated block starts


@dataclass
class Counts:
    """What one traced call did. FLOPs are multiply-adds x 2; bytes are activation bytes only."""

    matmul_flops: int = 0
    conv_flops: int = 0
    attention_flops: int = 0
    peak_bytes: int = 0
    written_bytes: int = 0  # bytes of new tensors written by ops that do no matmul (memory-bound work)
    largest_bytes: int = 0  # the largest single activation: what allocator blocks and workspaces scale with
    score_elements: int = 0  # the largest attention score matrix of one call (batch x heads x Lq x Lk)
    attention_calls: int = 0
    masked_attention_flops: int = 0  # of calls given an attention mask (which flash kernels refuse)

    def as_dict(self) -> dict[str, int]:
        return {
            "matmul_flops": self.matmul_flops,
            "conv_flops": self.conv_flops,
            "attention_flops": self.attention_flops,
            "activation_peak_bytes": self.peak_bytes,
            "written_bytes": self.written_bytes,
            "largest_tensor_bytes": self.largest_bytes,
            "score_elements": self.score_elements,
            "masked_attention_flops": self.masked_attention_flops,
        }


@dataclass
class Counter(TorchDispatchMode):
    """Dispatch mode that accumulates `Counts`; see the module docstring."""

    counts: Counts = field(default_factory=Counts)
    # (+bytes, storage) when a storage is created, (-bytes, storage) when freed, MARK where a block starts
    events: list[tuple[int, int]] = field(default_factory=list)
    _live: int = 0
    _tracked: set[int] = field(default_factory=set)
    _external: dict[int, Any] = field(default_factory=dict)  # storage id -> storage (kept alive)
    # The most live bytes while each leaf layer ran, one entry per layer call (`enter_leaf`): what
    # leaf-level offloading holds beside that layer's weights
    leaf_live: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def ignore(self, *objects: Any) -> None:
        """Storages of these tensors/modules existed before the call: not activations."""
        for obj in objects:
            tensors = (
                list(obj.parameters()) + list(obj.buffers())
                if isinstance(obj, torch.nn.Module)
                else tree_flatten(obj)[0]
            )
            for tensor in tensors:
                if isinstance(tensor, torch.Tensor):
                    storage = tensor.untyped_storage()
                    self._external[id(storage)] = storage

    def mark(self) -> None:
        """A repeated block starts here (see `advisor.trace.pattern`)."""
        self.events.append(MARK)

    def enter_leaf(self) -> None:
        """A leaf layer (Linear, Conv, ...) is called: the live bytes from here count for it."""
        self.leaf_live.append(self._live)

    def _release(self, key: int, nbytes: int) -> None:
        self._live -= nbytes
        self._tracked.discard(key)
        self.events.append((-nbytes, key))

    def _track(self, out: Any, memory_bound: bool) -> None:
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self._tracked or key in self._external:
                continue
            nbytes = storage.nbytes()
            self._tracked.add(key)
            self._live += nbytes
            self.events.append((nbytes, key))
            self.counts.largest_bytes = max(self.counts.largest_bytes, nbytes)
            if memory_bound:
                self.counts.written_bytes += nbytes
            weakref.finalize(storage, self._release, key, nbytes)
        self.counts.peak_bytes = max(self.counts.peak_bytes, self._live)
        if self.leaf_live:
            self.leaf_live[-1] = max(self.leaf_live[-1], self._live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        formula = flop_registry.get(packet)
        if formula is not None:
            flops = formula(*args, **kwargs, out_val=out)
            if packet in _CONV:
                self.counts.conv_flops += flops
            else:
                self.counts.matmul_flops += flops
        self._track(out, memory_bound=formula is None and packet not in _FACTORIES)
        return out

    def attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, masked: bool = False) -> None:
        """Account one attention call made through the stand-in (`masked`: given an attention mask)."""
        *batch, q_len, dim = query.shape
        k_len, v_dim = key.shape[-2], value.shape[-1]
        heads = 1
        for size in batch:
            heads *= size
        flops = 2 * heads * q_len * k_len * (dim + v_dim)
        self.counts.attention_flops += flops
        self.counts.masked_attention_flops += flops if masked else 0
        self.counts.score_elements = max(self.counts.score_elements, heads * q_len * k_len)
        self.counts.attention_calls += 1


@contextlib.contextmanager
def counting(*ignored: Any, counter: Counter | None = None) -> Iterator[Counts]:
    """Count the calls made inside the block: ``with counting(model, inputs) as counts: model(**inputs)``
    (into `counter`, when given, to read its events afterwards)."""
    counter = counter or Counter()
    counter.ignore(*ignored)
    original = torch.nn.functional.scaled_dot_product_attention

    def fused_attention(
        query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
    ):
        counter.attention(query, key, value, masked=attn_mask is not None)
        # What flash / memory-efficient kernels allocate: the output and a float32 log-sum-exp.
        logsumexp = torch.empty(query.shape[:-1], dtype=torch.float32, device=query.device)
        out = torch.empty((*query.shape[:-1], value.shape[-1]), dtype=query.dtype, device=query.device)
        if query.device.type != "meta":  # real tensors (the CPU checks): the real result, uncounted
            with _disable_current_modes():
                result = original(
                    query,
                    key,
                    value,
                    attn_mask=attn_mask,
                    dropout_p=dropout_p,
                    is_causal=is_causal,
                    scale=scale,
                    enable_gqa=enable_gqa,
                )
            out.copy_(result)
        del logsumexp
        return out

    torch.nn.functional.scaled_dot_product_attention = fused_attention
    try:
        with torch.no_grad(), counter:
            yield counter.counts
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
