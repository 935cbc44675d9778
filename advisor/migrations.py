"""How a config file written by an older advisor becomes one this advisor reads: one step per schema version.

`advisor.config.SCHEMA_VERSION` grows by one whenever the schema changes in a way a file can show (a
key added, renamed or removed, a value that means something else), and `MIGRATIONS` gains the step
from the version before: it takes a file's plain data at version N and returns it at N+1. A step
that only adds keys returns the data as it is (the older file is still valid), but is written out
all the same, so that each version says what it changed. Loading a file runs the steps from its
version up to this advisor's (`upgrade`); a file from a newer advisor is refused with "upgrade
advisor", since it may use keys this one does not know.

``tests/golden/config_schema.json`` holds the schema of every version, and
``tests/test_migrations.py`` fails when the schema changes without a new version and its step, and
loads the files today's code wrote (``tests/golden/written/``) through every later version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


FIRST_VERSION = 1


@dataclass(frozen=True)
class Migration:
    """The step from one schema version to the next."""

    changed: str  # what the next version changed, in one line (for the reader of a failed load)
    upgrade: Callable[[dict[str, Any]], dict[str, Any]]  # version N's data -> version N+1's


def unchanged(data: dict[str, Any]) -> dict[str, Any]:
    """The step of a version that only added keys: an older file is valid as it is."""
    return data


# Version N -> the step to N+1. Version 1 is the first.
MIGRATIONS: dict[int, Migration] = {
    1: Migration(
        "provenance gained ram_bytes, os and generations: the host, system and process a plan was made for",
        unchanged,
    ),
    2: Migration(
        "expandable_segments (default false): the caching allocator's segments grow in pages "
        "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)",
        unchanged,
    ),
    3: Migration(
        "quantization.backend gguf, with quantization.file: a pre-quantized GGUF checkpoint loaded as the component; "
        "quantization.backend quanto, with quantization.weights",
        unchanged,
    ),
    4: Migration(
        "lora (default none): the user's LoRAs the plan was made for (their rank, layers and parameters per "
        "component, read from each file's header) and how they run: fused, unfused, hotswappable",
        unchanged,
    ),
    5: Migration(
        "context_parallel and replicas (default none): a plan over several GPUs, one generation split by its "
        "sequence or one pipeline per GPU; offload.device_map (balanced: the components spread over the GPUs); "
        "provenance gained gpu_count and images",
        unchanged,
    ),
    6: Migration(
        "quantization.backend sdnq (SD.Next's quantizer), with quantization.weights from its own list",
        unchanged,
    ),
}


def upgrade(data: dict[str, Any], *, to: int) -> dict[str, Any]:
    """`data` (a config file's content at its ``schema_version``, from FIRST_VERSION to `to`) as
    version `to` writes it, by every step in between."""
    version = data["schema_version"]
    while version < to:
        data = {**MIGRATIONS[version].upgrade(dict(data)), "schema_version": version + 1}
        version += 1
    return data
