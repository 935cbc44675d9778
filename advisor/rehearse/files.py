"""Files a config names, in a rehearsal: their shapes, never their bytes.

A rehearsal builds the pipeline without weights; a file the config loads beside it (a LoRA, read by
diffusers with ``safetensors.torch.load_file``) is answered from its header the same way: empty
tensors of the header's names, shapes and dtypes (`advisor.probe.safetensors_header`), so that the
libraries convert, inject and place them as they would the file's, and nothing is read.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from advisor.probe.safetensors_header import read_header


def _from_header(filename: Any, device: Any = "cpu") -> dict[str, torch.Tensor]:
    return {t.name: torch.empty(t.shape, dtype=getattr(torch, t.dtype), device=device) for t in read_header(filename)}


@contextlib.contextmanager
def files_as_headers() -> Iterator[None]:
    """``safetensors.torch.load_file`` answered from the file's header while the block runs."""
    import safetensors.torch

    loaded = safetensors.torch.load_file
    safetensors.torch.load_file = _from_header
    try:
        yield
    finally:
        safetensors.torch.load_file = loaded
