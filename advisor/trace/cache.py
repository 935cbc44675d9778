"""Traces of models outside the catalog (local folders, hub snapshots): traced on first use and
cached under the user's cache directory, so the next plan is pure arithmetic again.

Catalog entries carry their traces (``scripts/build_catalog.py``); this is the same tracer, run
where the model is first planned. A component the tracer can't run keeps no trace: the estimate
falls back to its parameter formula and says so in its notes.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Callable

from advisor.errors import AdvisorError, AdvisorWarning, is_oom
from advisor.files import cache_folder_problem, os_error_reason, read_json, write_text_atomic
from advisor.paths import advisor_cache_dir
from advisor.plan.compute import TRACE_VERSION
from advisor.probe.models import ModelProfile


TRACED_ROLES = ("denoiser", "text_encoder", "vae")


def cache_path(profile: ModelProfile) -> Path:
    """One file per pipeline shape: the pipeline class and every component's class and config."""
    shape = {
        "version": TRACE_VERSION,
        "pipeline_class": profile.pipeline_class,
        "components": [[c.name, c.library, c.class_name, c.config] for c in profile.components],
    }
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return advisor_cache_dir() / "traces" / f"{profile.pipeline_class}-{digest}.json"


def _read(path: Path) -> dict:
    """The cached traces, or nothing when the file is missing or unusable (it is a cache: traced again)."""
    try:
        data = read_json(path, error=AdvisorError)
    except AdvisorError:
        return {}
    return data if isinstance(data, dict) else {}


def with_traces(profile: ModelProfile, log: Callable[[str], None] = lambda _line: None) -> ModelProfile:
    """`profile` with a trace on every component that can have one (from the cache, or traced now)."""
    missing = [c for c in profile.components if c.trace is None and c.role in TRACED_ROLES and c.config]
    if not missing:
        return profile
    path = cache_path(profile)
    cached = _read(path)
    for component in missing:
        entry = cached.get(component.name)
        if isinstance(entry, dict) and "failed" in entry:  # tried before: don't pay for it again
            continue
        if isinstance(entry, dict):
            component.trace = entry
            continue
        try:
            from advisor.trace.tracer import trace_component, traceable  # torch, diffusers: only when tracing

            reason = traceable(component)
            if reason:
                log(f"{component.name}: not traced ({reason}); estimated with the parameter formula")
                continue
            log(f"tracing {component.name} ({component.class_name}) on the meta device: first use, cached in {path}")
            component.trace = trace_component(profile, component)
        except Exception as exc:  # a model the tracer can't run must not stop the plan
            log(
                f"{component.name}: could not trace ({type(exc).__name__}: {exc}); estimated with the parameter formula"
            )
            if is_oom(exc):  # this machine's memory, not the model: traced again next time
                continue
            cached[component.name] = {"failed": f"{type(exc).__name__}: {exc}"}
        else:
            cached[component.name] = component.trace
        _write(path, cached)
    return profile


def _write(path: Path, cached: dict) -> None:
    """Keep the traces in `path`; where the cache folder can't be written, say so (once) and go on:
    the plan has its traces, the next one traces again."""
    try:
        write_text_atomic(path, json.dumps(cached))
    except OSError as exc:
        problem = cache_folder_problem() or f"{path}: {os_error_reason(exc)}; set XDG_CACHE_HOME to a writable folder"
        warnings.warn(f"traces are not kept: {problem}", AdvisorWarning, stacklevel=2)
