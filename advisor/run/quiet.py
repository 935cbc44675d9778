"""Known, harmless noise of the libraries a pipeline load imports, kept off the user's terminal.

`advisor tune` runs trials in child processes whose output it keeps; `load_pipeline` and
`apply_config` run in the user's, where the same import noise would land. Only messages that say
nothing about the user's pipeline are dropped, by a filter on the logger that writes them:

- torchao logs "Failed to load <kernel>.so" for each optional C++ extension built for another GPU
  or Python (``torchao/__init__.py``); its Python kernels, which diffusers uses, are unaffected;
- torch's pytree logs a deprecation of ``register_constant`` on Enum classes that torchao registers
  (``torch/utils/_pytree.py``), about torchao's code, not the user's.
"""

from __future__ import annotations

import logging
from typing import Callable

from advisor.levers.torchao import TORCHAO_BACKEND


# logger name -> whether a message of it is the harmless one
HARMLESS: dict[str, Callable[[str], bool]] = {
    TORCHAO_BACKEND.package: lambda message: message.startswith("Failed to load ") and ".so" in message,
    "torch.utils._pytree": lambda message: "register_constant()" in message and "Enum" in message,
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
