"""``torch.cuda`` (and ``torch.accelerator``) answering as one card, while a rehearsal runs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from advisor.rehearse.virtual import CUDA, Ledger


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


VIRTUAL_CUDA_VERSION = "12.8"  # what torch.version.cuda says during a rehearsal (a CPU build says None)


@contextlib.contextmanager
def cuda_runtime(ledger: Ledger, name: str, total_bytes: int, capability: tuple[int, int]) -> Iterator[None]:
    """``torch.cuda`` (and ``torch.accelerator``) answering as one card: available, one device, its
    name and memory, the ledger's allocated bytes; streams and events that order nothing."""
    default = _Stream()
    streams = [default]  # every stream made, so that each has a number the ledger can record
    current = [default]

    @contextlib.contextmanager
    def on_stream(stream: Any = None) -> Iterator[Any]:
        """``torch.cuda.stream(s)``: what is allocated inside comes from `s`'s own pool."""
        if stream is None:
            yield None
            return
        if not any(s is stream for s in streams):
            streams.append(stream)
        saved = ledger.stream, current[0]
        ledger.stream, current[0] = next(i for i, s in enumerate(streams) if s is stream), stream
        try:
            yield stream
        finally:
            ledger.stream, current[0] = saved

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
        (torch.cuda, "empty_cache"): ledger.empty_cache,
        (torch.cuda, "Stream"): _Stream,
        (torch.cuda, "Event"): _Event,
        (torch.cuda, "current_stream"): lambda device=None: current[0],
        (torch.cuda, "default_stream"): lambda device=None: default,
        (torch.cuda, "stream"): on_stream,
        # A CUDA build's version string: libraries gate CUDA kernels on it (torchao's is_sm_at_least_89).
        (torch.version, "cuda"): VIRTUAL_CUDA_VERSION,
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
