"""Known, harmless noise of the libraries a pipeline load imports, kept off the user's terminal.

`advisor tune` runs trials in child processes whose output it keeps; `load_pipeline` and
`apply_config` run in the user's, where the same import noise would land. Only messages that say
nothing about the user's pipeline are dropped, by a filter on the logger that writes them:

- torchao logs "Failed to load <kernel>.so" for each optional C++ extension built for another GPU
  or Python (``torchao/__init__.py``); its Python kernels, which diffusers uses, are unaffected;
- torch's pytree logs a deprecation of ``register_constant`` on Enum classes that torchao registers
  (``torch/utils/_pytree.py``), about torchao's code, not the user's;
- on a CPU with AVX512-BF16, bitsandbytes' CPU backend asks the hub for an optional CPU 4-bit kernel
  at import (``bitsandbytes/backends/cpu/ops.py``) and logs "Failed to load CPU gemm_4bit_forward"
  when it can't have it (offline, say), with the ``kernels`` package's "Skipping publisher trust
  check" before it; the plain CPU kernel runs instead, and the advisor plans bitsandbytes on CUDA;
- transformers says an image processor falls back to its PIL version without torchvision
  (``transformers/utils/import_utils.py``): the pipelines the advisor plans take prompts, not images;
- diffusers' torchao quantizer warns that it can't import torchao's serialized tensor classes, which
  only loading a checkpoint saved pre-quantized with torchao needs (``torchao_quantizer.py``); the
  advisor quantizes while loading.
"""

from __future__ import annotations

import logging
from typing import Callable

from advisor.levers.bitsandbytes import BITSANDBYTES
from advisor.levers.torchao import TORCHAO_BACKEND


# logger name -> whether a message of it is the harmless one
HARMLESS: dict[str, Callable[[str], bool]] = {
    TORCHAO_BACKEND.package: lambda message: message.startswith("Failed to load ") and ".so" in message,
    "torch.utils._pytree": lambda message: "register_constant()" in message and "Enum" in message,
    f"{BITSANDBYTES.package}.backends.cpu.ops": lambda message: message.startswith(
        "Failed to load CPU gemm_4bit_forward"
    ),
    "kernels._internals.hf_hub": lambda message: message.startswith("Skipping publisher trust check"),
    "transformers.utils.import_utils": lambda message: "requires torchvision (not installed); falling back" in message,
    "diffusers.quantizers.torchao.torchao_quantizer": lambda message: message.startswith(
        "Unable to import `torchao` Tensor objects"
    ),
}


class _DropHarmless(logging.Filter):
    def __init__(self, harmless: Callable[[str], bool]) -> None:
        super().__init__()
        self.harmless = harmless

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.harmless(record.getMessage())


def quiet_library_noise() -> None:
    """Drop the harmless messages (`HARMLESS`) from now on; idempotent."""
    for name, harmless in HARMLESS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHarmless) for f in logger.filters):
            logger.addFilter(_DropHarmless(harmless))
