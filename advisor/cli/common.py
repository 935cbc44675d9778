"""What the commands share: JSON output, the model's profile for planning, flag values, writing a config."""

from __future__ import annotations

import json
import math
import sys
from typing import TYPE_CHECKING, Any

from advisor.errors import AdvisorError, ConfigError, UsageError
from advisor.files import os_error_reason
from advisor.probe.interconnect import joined_gpus
from advisor.units import parse_size


if TYPE_CHECKING:
    from advisor.plan.scenario import Request


# The command line's state: --debug, and the arguments as given (what `tune --workers` hands on).
state: dict[str, Any] = {"debug": False}
DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"  # recommend's, said as an assumption
NOTHING_FITS_EXIT = 3


def strict(data: Any) -> Any:
    """`data` with non-finite numbers (a CPU's infinite host->device bandwidth) as null: JSON has no Infinity."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: strict(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict(value) for value in data]
    return data


def print_json(data: Any) -> None:
    """Machine output: exactly one strict JSON object on stdout."""
    sys.stdout.write(json.dumps(strict(data), indent=2, allow_nan=False) + "\n")


def planning_profile(model: str, workload: str | None):
    """The model's profile with its traced FLOP and activation curves: the catalog carries them; a
    local folder or hub model is traced on first use (this imports torch) and cached."""
    from advisor.probe.models import load_profile

    profile = checked_kind(load_profile(model, workload=workload), workload)
    if profile.workload not in ("image", "video"):  # before a local model is traced
        raise UsageError(
            f"--workload: {profile.workload} pipelines are not planned (yet); the advisor plans image and video"
        )
    if profile.source == "catalog":
        return profile
    from advisor.trace.cache import with_traces

    return with_traces(profile, log=lambda line: print(f"advisor: {line}", file=sys.stderr, flush=True))


def recorded_job(request, profile, provenance, source: str):
    """(the workload, the values taken from `provenance`): what a config was made for fills in what
    no flag gives (flags win one by one); `source` names the config in the error when it doesn't suit."""
    from dataclasses import replace

    from advisor.probe.workload import recorded_workload

    flags = request.job()
    recorded = {k: v for k, v in recorded_workload(provenance, profile).items() if flags[k] is None}
    try:
        return replace(request, **recorded).workload_for(profile), recorded
    except UsageError as exc:
        raise ConfigError(
            f"{source}: its workload (provenance.workload) does not suit {profile.model_id}: {exc}"
        ) from None


def checked_kind(profile, workload: str | None):
    """`profile`, unless --workload contradicts what the advisor knows its pipeline class to be:
    --workload is for pipelines it does not know (a Flux pipeline makes no video)."""
    from advisor.probe.facts import known_workload

    known = known_workload(profile.pipeline_class)
    if workload is not None and known is not None and workload != known:
        article = "an" if known[0] in "aeiou" else "a"
        raise UsageError(
            f"--workload: {profile.model_id} is a {profile.pipeline_class}, {article} {known} pipeline, so it makes no "
            f"{workload}; leave --workload out (it is for pipelines the advisor does not know)"
        )
    return profile


def required_model(model: str | None, command: str) -> str:
    if not model:
        raise UsageError(
            f"MODEL: none given; name the pipeline first (advisor {command} flux-dev ...) or as --model: "
            "a hub id, a catalog alias or a local folder"
        )
    return model


def flag_size(text: str | None, flag: str) -> int | None:
    return parse_size(text, name=flag) if text is not None else None


def save_config(config, output: str) -> None:
    """`config.save(output)`; a failure (the path was checked up front: a full disk, say) names ``-o``."""
    try:
        config.save(output)
    except OSError as exc:
        raise AdvisorError(f"-o {output}: could not write the config ({os_error_reason(exc)})") from None


# The flags beside the model that ask a planning question (`advisor.plan.scenario.Request`), as the
# parser names them.
REQUEST_FLAGS = (
    "workload",
    "height",
    "width",
    "frames",
    "steps",
    "batch",
    "guidance_scale",
    "loras",
    "lora_rank",
    "lora_count",
    "lora_swap",
    "generations",
    "images",
    "vram",
    "ram",
    "gpu",
    "os",
    "budget",
    "quality",
)
PLANNING_COMMANDS = ("estimate", "recommend", "tune", "check")


def take_request(namespace: dict[str, Any], command: str) -> Request:
    """The planning question `command`'s flags ask, taken out of the parsed `namespace` once: sizes
    in bytes (an error names its flag). With no model, recommend plans FLUX.1-dev and says so; the
    others refuse (measuring a model nobody named would start a download of tens of GB)."""
    from advisor.plan.scenario import Request

    given = {name: namespace.pop(name) for name in REQUEST_FLAGS if name in namespace}
    model, assumed = namespace.pop("model", None), ()
    if not model and command == "recommend":
        model, assumed = DEFAULT_MODEL, (f"model: {DEFAULT_MODEL} (none given; pass MODEL or --model)",)
    if not (command == "check" and not model):  # check takes the model its config records
        model = required_model(model, command)
    for name in ("vram", "ram"):
        if name in given:
            given[name] = flag_size(given[name], f"--{name}")
    if "budget" in given:
        given["budget_bytes"] = flag_size(given.pop("budget"), "--budget")
    given["loras"] = tuple(given.get("loras", ()))
    given["gpu"] = joined_gpus(given.get("gpu"))
    return Request(model, assumed=assumed, **given)
