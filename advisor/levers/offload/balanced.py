"""Components spread over several GPUs: what diffusers' ``device_map="balanced"`` does, predicted.

diffusers 0.42.1 (``_get_final_device_map`` and ``_assign_components_to_devices`` in
``pipelines/pipeline_loading_utils.py``) sizes each component on the meta device at the load dtype
(``compute_module_sizes``: weights only, and before any quantization), sorts them largest first,
and deals them out over the GPUs, sorted by free memory, in a zig-zag (0, 1, ..., n-1, n-1, ..., 0):
the first component to card 0, the next two to card 1 on two cards, the fourth back to card 0, so
FLUX.1-dev's VAE lands on its transformer's card. A component larger than what its turn's card has
left goes to the CPU (and the turn does not move on); each component is loaded onto its card and
dispatched with hooks that move its inputs there (``dispatch_model(..., force_hooks=True)``).
"""

from __future__ import annotations

from typing import Any

from advisor.config import DTYPE_BYTES


CPU = "cpu"


def balanced_map(components: list[Any], dtype: str, gpus: int, free_bytes: int) -> dict[str, int | str]:
    """Component name -> the GPU index ``device_map="balanced"`` puts it on, or "cpu", for
    `components` (`advisor.probe.models.ComponentProfile`) at `dtype` over `gpus` cards with
    `free_bytes` each (equal cards: their sort keeps index order)."""
    sizes = sorted(
        ((c.name, c.parameters * DTYPE_BYTES[dtype]) for c in components),
        key=lambda item: item[1],
        reverse=True,
    )
    cycle = [*range(gpus), *reversed(range(gpus))]
    left = dict.fromkeys(range(gpus), free_bytes)
    placed: dict[str, int | str] = {}
    turn = 0
    for name, size in sizes:
        card = cycle[turn % len(cycle)]
        if size > left[card]:
            placed[name] = CPU  # diffusers maps it to "cpu" and tries the same card for the next one
            continue
        placed[name] = card
        left[card] -= size
        turn += 1
    return placed
