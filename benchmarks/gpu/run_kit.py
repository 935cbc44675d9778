"""The GPU kit: measure the advisor's GPU paths on a briefly lent H100/H200 with no network.

One command does everything (docs/gpu-kit.md has the exact `run` call)::

    bash benchmarks/gpu/run.sh [--budget-s 480] [--depth 0.25] [--parts seed,recommend,tune,offload]
    bash benchmarks/gpu/run.sh --dry-run      # the same code path on this CPU, tiny pipeline, ~1 min

1. **Install** the wheels carried in ``benchmarks/gpu/wheels`` (``fetch_wheels.py``) into a
   temporary ``--target`` folder, only those the machine's Python lacks or has too old (a small
   resolver over the wheels' metadata; the image's torch is never touched), then re-run itself with
   that folder and the repository on ``PYTHONPATH``.
2. **Build** a FLUX.1-dev-shaped pipeline with random weights from the catalog's component configs
   (``advisor/catalog/flux.1-dev.json``), on the GPU, in bf16, saved once under ``--work`` and reused.
   ``--depth`` scales the transformer's double- and single-stream block counts and T5's layers (full
   width, full CLIP and VAE); ``--depth 1`` is the real 12B + 4.7B size (31 GiB on disk).
3. **Measure**, each candidate in its own process (`advisor.run.measure.measure`: latency extrapolated
   from 2- and 4-step runs, ``max_memory_allocated`` and ``max_memory_reserved``), most valuable first:
   ``seed`` (the seed page's three nf4 combinations), ``recommend`` (the rule engine's pick for 16 GB
   and 13 GB, with the estimate's predicted peak next to the measured one), ``tune`` (``advisor tune
   --budget 15GB`` with a small trial cap, relative to the seed's quantization + compile) and
   ``offload`` (group offload block/leaf with and without streams, sequential offload, against bf16
   without offload: the estimate's offload terms). Budgets are for full-size FLUX.1-dev; with
   ``--depth < 1`` they are scaled by the estimate's peak of the seed's nf4 combination at that depth
   over the full size (stated in the output).
4. **Report**: a table last on stdout; everything as JSON in ``$OUT/gpu_kit.json`` (written after
   every item, so a run cut short still returns what it measured), the table as ``$OUT/gpu_kit.md``
   and the log as ``$OUT/gpu_kit.log``.

The kit enforces its own time budget (``--budget-s``, counted from the start, installation
included): an item whose expected time (the estimate's latency times a correction learnt from the
items already measured, plus start-up, loading and compilation) does not fit what is left is
skipped with the reason, and every measurement's timeout is cut to what is left.

``--dry-run`` runs the same plan on the CPU with ``advisor.testing.build_tiny_flux`` and CPU-valid
equivalents of the GPU-only options, each mapping noted in the results: bitsandbytes nf4 -> torchao
int8 weight-only, inductor -> the eager compile backend, model and sequential offload -> group offload,
every group offload -> block level without streams (leaf level for compiled torchao models); tune
searches without compile, 1 trial.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
WHEELS = HERE / "wheels"
GIB = 2**30
KIT_VERSION = 1
PARTS = ("seed", "recommend", "tune", "offload")
# Full-size FLUX.1-dev budgets of the brief; the seed page's table, RTX 4090 (latency s, memory GB).
RECOMMEND_BUDGETS_GB = (16, 13)
TUNE_BUDGET_GB = 15
SEED_PAGE = {
    "quantization": {"latency_s": 32.602, "memory_gb": 14.9453},
    "quantization+compile": {"latency_s": 25.847, "memory_gb": 14.9448},
    "quantization+compile+model-offload": {"latency_s": 32.312, "memory_gb": 12.2369},
}
SAFETY_S = 15.0  # kept free at the end for writing results
# FLUX.1-dev's scheduler_config.json (not in the catalog, which holds the weighted components only).
FLUX_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
_CONFIG_NOISE = {"architectures", "torch_dtype", "dtype", "transformers_version", "model_type"}


# --- logging ----------------------------------------------------------------------------------------


class Log:
    """Timestamped lines on stdout, copied to a log file when one is set."""

    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.path: Path | None = None

    def __call__(self, message: str) -> None:
        line = f"[{time.time() - self.t0:6.1f}s] {message}"
        print(line, flush=True)
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(line + "\n")


# --- 1. installing the carried wheels ---------------------------------------------------------------


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_wheel(path: Path) -> tuple[str, str, list[str]]:
    """(canonical name, version, Requires-Dist lines) from a wheel's METADATA."""
    with zipfile.ZipFile(path) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = wheel.read(meta).decode("utf-8", "replace")
    headers = text.split("\n\n", 1)[0].splitlines()
    value = lambda key: next(line.split(":", 1)[1].strip() for line in headers if line.startswith(key + ":"))  # noqa: E731
    requires = [line.split(":", 1)[1].strip() for line in headers if line.startswith("Requires-Dist:")]
    return canonical(value("Name")), value("Version"), requires


# matplotlib serves only `advisor tune --report`, which the kit does not use; carrying it and its
# dependencies would cost about 15 MiB of the 64 that may travel.
NOT_NEEDED_BY_THE_KIT = {"matplotlib"}


def project_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """The project's runtime dependencies (``[project] dependencies``) that the kit needs."""
    import tomllib

    requirements = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return [r for r in requirements if re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() not in NOT_NEEDED_BY_THE_KIT]


def installed_version(name: str) -> str | None:
    from importlib import metadata

    for candidate in (name, name.replace("-", "_")):
        try:
            return metadata.version(candidate)
        except metadata.PackageNotFoundError:
            continue
    return None


@dataclass
class InstallPlan:
    """Which carried wheels to install, and what the machine already satisfies."""

    install: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {version, file, why}
    satisfied: dict[str, str] = field(default_factory=dict)  # name -> installed version
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"install": self.install, "satisfied": self.satisfied, "problems": self.problems, "warnings": self.warnings}


def plan_install(
    wheels: dict[str, tuple[str, Path, list[str]]],
    roots: list[str],
    installed: Callable[[str], str | None] = installed_version,
) -> InstallPlan:
    """Resolve `roots` against the installed packages first and the carried `wheels` second.

    `wheels` maps a canonical name to (version, path, Requires-Dist). A requirement the installed
    version satisfies is left alone; otherwise the carried wheel is chosen if it satisfies it, and
    its own requirements are resolved in turn. Anything neither satisfies is a problem (reported,
    not fatal: the measurements that need it fail with their own error).
    """
    from packaging.requirements import Requirement

    plan = InstallPlan()
    edges: list[tuple[Requirement, str]] = []
    queue = [(Requirement(r), "advisor") for r in roots]
    while queue:
        requirement, asked_by = queue.pop(0)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonical(requirement.name)
        edges.append((requirement, asked_by))
        if name in plan.install or name in plan.satisfied:
            continue
        have = installed(name)
        if have is not None and requirement.specifier.contains(have, prereleases=True):
            plan.satisfied[name] = have
            continue
        carried = wheels.get(name)
        if carried is not None and requirement.specifier.contains(carried[0], prereleases=True):
            version, path, requires = carried
            why = f"{requirement} asked by {asked_by}: " + (f"installed {have} does not satisfy it" if have else "not installed")
            plan.install[name] = {"version": version, "file": path.name, "why": why}
            queue += [(Requirement(r), f"{name} {version}") for r in requires]
            continue
        plan.problems.append(
            f"{requirement} (asked by {asked_by}): " + (f"installed {have}" if have else "not installed")
            + (f", carried {carried[0]} does not satisfy it" if carried else ", not carried")
        )
    # A later requirement may have replaced a version an earlier one accepted: check every edge.
    for requirement, asked_by in edges:
        name = canonical(requirement.name)
        final = plan.install.get(name, {}).get("version") or plan.satisfied.get(name)
        if final is not None and not requirement.specifier.contains(final, prereleases=True):
            plan.problems.append(f"{requirement} (asked by {asked_by}) but {name} {final} is what will be used")
    for name, chosen in plan.install.items():
        if installed(name) is not None:
            plan.warnings += _shadowing_conflicts(name, chosen["version"])
    return plan


def _shadowing_conflicts(name: str, version: str) -> list[str]:
    """Installed distributions whose requirement on `name` the carried `version` breaks."""
    from importlib import metadata

    from packaging.requirements import InvalidRequirement, Requirement

    found = []
    for dist in metadata.distributions():
        for line in dist.requires or []:
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                continue
            if canonical(requirement.name) != name:
                continue
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            if not requirement.specifier.contains(version, prereleases=True):
                found.append(f"carried {name} {version} shadows the installed one, but {dist.metadata['Name']} asks for {requirement}")
    return found


def carried_wheels(folder: Path) -> dict[str, tuple[str, Path, list[str]]]:
    wheels = {}
    for path in sorted(folder.glob("*.whl")):
        name, version, requires = read_wheel(path)
        wheels[name] = (version, path, requires)
    return wheels


def install_wheels(paths: list[Path], site: Path, log: Log) -> str:
    """Install `paths` into `site` with pip (no index, no dependencies), or unpack them without pip."""
    site.mkdir(parents=True, exist_ok=True)
    if not paths:
        return "nothing to install"
    command = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--disable-pip-version-check",
               "-q", "--upgrade", "--target", str(site), *map(str, paths)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode == 0:
            return f"pip installed {len(paths)} wheels"
        log(f"pip install failed ({done.returncode}): {done.stderr.strip()[-500:]}; unpacking the wheels instead")
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"pip unusable ({exc}); unpacking the wheels instead")
    for path in paths:  # a wheel is a zip of the site-packages layout (plus .data/ for scripts/headers)
        with zipfile.ZipFile(path) as wheel:
            for member in wheel.namelist():
                parts = member.split("/")
                if parts[0].endswith(".data"):
                    if len(parts) > 2 and parts[1] in ("purelib", "platlib"):
                        target = site.joinpath(*parts[2:])
                    else:
                        continue
                else:
                    target = site / member
                if member.endswith("/"):
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(wheel.read(member))
    return f"unpacked {len(paths)} wheels"


def bootstrap(args: argparse.Namespace, log: Log) -> dict[str, Any]:
    """Plan the installation; if wheels are needed, install them and re-run this script with them on
    PYTHONPATH (never returns then). Returns what was done, for the results."""
    site_env = os.environ.get("ADVISOR_GPU_KIT_SITE")
    if site_env is not None:  # the re-run: the record was left next to the installed packages
        record_path = Path(site_env) / "kit_install.json"
        return json.loads(record_path.read_text()) if record_path.is_file() else {"site": site_env}
    record: dict[str, Any] = {"wheels": str(args.wheels)}
    if not (args.wheels.is_dir() and any(args.wheels.glob("*.whl"))):
        record["result"] = f"no wheels in {args.wheels} (run benchmarks/gpu/fetch_wheels.py where PyPI is reachable)"
        log(record["result"])
        return record
    wheels = carried_wheels(args.wheels)
    plan = plan_install(wheels, project_requirements())
    record["plan"] = plan.to_dict()
    log(f"install plan: {len(plan.install)} of {len(wheels)} carried wheels needed "
        f"({', '.join(n + ' ' + v['version'] for n, v in plan.install.items()) or 'none'})")
    for line in plan.problems:
        log(f"  PROBLEM {line}")
    for line in plan.warnings:
        log(f"  warning {line}")
    if args.dry_run or args.no_install or not plan.install:
        record["result"] = "not installed: " + ("dry run, planned only" if args.dry_run else "--no-install" if args.no_install else "nothing needed")
        return record
    site = Path(tempfile.mkdtemp(prefix="advisor-gpu-kit-site-"))
    started = time.time()
    record.update(site=str(site), result=install_wheels([wheels[n][1] for n in plan.install], site, log))
    record["install_s"] = round(time.time() - started, 2)
    log(f"{record['result']} into {site} in {record['install_s']} s")
    (site / "kit_install.json").write_text(json.dumps(record, indent=2))
    env = dict(os.environ)
    env["ADVISOR_GPU_KIT_SITE"] = str(site)
    env["ADVISOR_GPU_KIT_T0"] = repr(log.t0)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(REPO), env.get("PYTHONPATH", "")) if p)
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env)
    raise AssertionError("unreachable")


# --- 2. the FLUX.1-dev-shaped pipeline -----------------------------------------------------------------


def catalog_entry() -> dict[str, Any]:
    return json.loads((REPO / "advisor" / "catalog" / "flux.1-dev.json").read_text())


def scaled_flux_configs(entry: dict[str, Any], depth: float) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Each weighted component's config from the catalog, with depth scaled; and the scaling applied.

    ``depth`` (0 < depth <= 1) multiplies the transformer's ``num_layers`` (19) and
    ``num_single_layers`` (38) and T5's ``num_layers`` (24), rounded, at least 1. Widths, CLIP and the
    VAE stay at full size, so per-block time and memory and the activations are FLUX.1-dev's.
    """
    if not 0 < depth <= 1:
        raise ValueError(f"--depth: {depth} must be in (0, 1]")
    configs, scaling = {}, {"depth": depth}
    for component in entry["components"]:
        config = {k: v for k, v in component["config"].items() if not k.startswith("_") and k not in _CONFIG_NOISE}
        keys = {"transformer": ("num_layers", "num_single_layers"), "text_encoder_2": ("num_layers",)}.get(component["name"], ())
        for key in keys:
            full = config[key]
            config[key] = max(1, round(full * depth))
            scaling[f"{component['name']}.{key}"] = {"full": full, "used": config[key]}
        configs[component["name"]] = {"class_name": component["class_name"], "config": config}
    return configs, scaling


def _build_child(spec: dict[str, Any]) -> dict[str, Any]:
    """In a child process: build the pipeline on `spec['device']` in bf16 and save it (timings returned)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from advisor.testing import offline_tokenizer

    configs = spec["configs"]
    device = torch.device(spec["device"])
    started = time.perf_counter()
    torch.manual_seed(spec.get("seed", 0))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with device:  # parameters are created, and randomly initialised, on the GPU directly
            transformer = FluxTransformer2DModel.from_config(configs["transformer"]["config"])
            text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]["config"]))
            text_encoder_2 = T5EncoderModel(T5Config(**configs["text_encoder_2"]["config"]))
            vae = AutoencoderKL.from_config(configs["vae"]["config"])
    finally:
        torch.set_default_dtype(default)
    models = (transformer, text_encoder, text_encoder_2, vae)
    for model in models:
        if any(p.dtype != torch.bfloat16 for p in model.parameters()):
            model.to(torch.bfloat16)
        model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize()
    construct_s = time.perf_counter() - started
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=offline_tokenizer(model_max_length=77),
        text_encoder_2=text_encoder_2,
        tokenizer_2=offline_tokenizer(model_max_length=512),
        transformer=transformer,
    )
    started = time.perf_counter()
    pipe.save_pretrained(spec["folder"], safe_serialization=True)
    return {
        "construct_s": round(construct_s, 2),
        "save_s": round(time.perf_counter() - started, 2),
        "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in zip(("transformer", "text_encoder", "text_encoder_2", "vae"), models, strict=True)},
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def ensure_flux_dev_shaped(work: Path, depth: float, log: Log, timeout_s: float) -> tuple[Path, dict[str, Any]]:
    """The FLUX.1-dev-shaped folder for `depth` under `work`, built (in a child process) unless already there."""
    configs, scaling = scaled_flux_configs(catalog_entry(), depth)
    folder = work / f"flux-dev-shaped-depth{depth:g}"
    marker = folder / "kit_model.json"
    if marker.is_file() and (folder / "model_index.json").is_file():
        info = json.loads(marker.read_text())
        log(f"reusing {folder} ({info['bytes'] / GIB:.1f} GiB)")
        return folder, {**info, "reused": True}
    needed = sum(c["parameters"] for c in catalog_entry()["components"]) * 2 * depth * 1.1
    free = shutil.disk_usage(work).free
    if free < needed:
        raise RuntimeError(f"{work}: {free / GIB:.1f} GiB free, the depth-{depth:g} pipeline needs about {needed / GIB:.1f} GiB")
    staging = work / f".{folder.name}.building"
    shutil.rmtree(staging, ignore_errors=True)
    log(f"building the FLUX.1-dev-shaped pipeline at depth {depth:g} on the GPU ({scaling})")
    started = time.time()
    spec = {"configs": configs, "device": "cuda", "folder": str(staging), "seed": 0}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--internal", "build", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"building the pipeline failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    info = json.loads(done.stdout.strip().splitlines()[-1])
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    info.update(scaling=scaling, bytes=folder_bytes(folder), build_s=round(time.time() - started, 2), folder=str(folder))
    marker.write_text(json.dumps(info, indent=2))
    log(f"built {folder} in {info['build_s']} s (construct {info['construct_s']} s, save {info['save_s']} s, {info['bytes'] / GIB:.1f} GiB)")
    return folder, {**info, "reused": False}


# --- 3. the machine, in a child process (the kit's own process never initialises CUDA) -----------------


def _environment_child(spec: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0]}
    import importlib

    for name in ("torch", "diffusers", "transformers", "accelerate", "bitsandbytes", "optuna", "huggingface_hub", "pydantic", "torchao"):
        try:
            info[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as exc:  # a broken optional package is a finding, not a crash
            info[name] = None
            info[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    import torch

    info["cuda_runtime"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, compute_capability=f"{props.major}.{props.minor}")
    if spec.get("bnb_smoke") and info.get("bitsandbytes"):
        try:
            import bitsandbytes.functional as F

            weight = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
            packed, state = F.quantize_4bit(weight, quant_type="nf4")
            error = (F.dequantize_4bit(packed, state) - weight).abs().mean().item()
            info["bitsandbytes_smoke"] = {"ok": True, "nf4_mean_abs_error": error}
        except Exception as exc:
            info["bitsandbytes_smoke"] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
    try:
        from advisor.probe.calibrate import calibrate

        info["calibration"] = calibrate(seconds=spec.get("calibrate_s", 0.5))
    except Exception as exc:
        info["calibration"] = {"error": f"{type(exc).__name__}: {exc}"}
    return info


def torch_cuda_version() -> str | None:
    """torch's CUDA release ("13.0") read from torch/version.py, without importing torch."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return None
    text = (Path(spec.origin).parent / "version.py").read_text()
    found = re.search(r"^cuda[^=]*=\s*['\"]([\d.]+)['\"]", text, re.M)
    return found.group(1) if found else None


def bitsandbytes_library(cuda: str | None) -> tuple[str | None, str]:
    """The BNB_CUDA_VERSION to set (None: leave it) and a note on bitsandbytes' native library."""
    import importlib.util

    spec = importlib.util.find_spec("bitsandbytes")
    if spec is None or spec.origin is None:
        return None, "bitsandbytes is not installed"
    if cuda is None:
        return None, "torch has no CUDA"
    libs = {m.group(1): p.name for p in Path(spec.origin).parent.glob("libbitsandbytes_cuda*.so") if (m := re.search(r"cuda(\d+)", p.name))}
    wanted = cuda.replace(".", "")
    if wanted in libs:
        return None, f"libbitsandbytes_cuda{wanted}.so matches torch's CUDA {cuda}"
    same_major = sorted((v for v in libs if v[:-1] == wanted[:-1]), key=int)
    if not same_major:
        return None, f"no bitsandbytes library for CUDA {cuda} (carried: {sorted(libs)}); bitsandbytes parts will fail"
    below = [v for v in same_major if int(v) <= int(wanted)]
    chosen = below[-1] if below else same_major[0]
    return chosen, f"no library for CUDA {cuda}; BNB_CUDA_VERSION={chosen} (same major release; carried {sorted(libs)})"


# --- 4. what to measure ------------------------------------------------------------------------------


@dataclass
class Item:
    """One measurement (or study) of the plan, and what came of it."""

    id: str
    part: str
    label: str
    config: Any = None  # OptimizationConfig; None for the tune study
    notes: list[str] = field(default_factory=list)
    reference: dict[str, Any] | None = None
    budget_bytes: int | None = None
    status: str = "planned"  # ok | oom | crash | timeout | skipped | reused | nothing-fits | error
    result: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "part": self.part,
            "label": self.label,
            "status": self.status,
            "summary": self.config.summary() if self.config is not None else None,
            "config": self.config.model_dump(mode="json", exclude_none=True, exclude={"provenance"}) if self.config is not None else None,
            "budget_bytes": self.budget_bytes,
            "notes": self.notes,
            "reference": self.reference,
            **self.result,
        }


def config_key(config: Any) -> str:
    """Identity of a config for reuse: everything but provenance."""
    return config.model_dump_json(exclude={"provenance"})


def cpu_equivalent(config: Any, *, torchao: bool) -> tuple[Any, list[str]]:
    """A CPU-valid stand-in for a GPU config, and a note per change (for --dry-run)."""
    from advisor.config import Offload, Quantization

    notes, update = [], {}
    if config.device != "cpu":
        update["device"] = "cpu"
    if config.dtype != "float32":
        update["dtype"] = "float32"
        notes.append(f"dtype {config.dtype} -> float32 (CPU)")
    q = config.quantization
    if q is not None and q.backend.startswith("bitsandbytes"):
        if torchao:
            update["quantization"] = Quantization(backend="torchao", components=q.components, scheme="int8_weight_only")
            notes.append(f"{q.label()} -> torchao int8 weight-only (bitsandbytes needs CUDA)")
        else:
            update["quantization"] = None
            notes.append(f"{q.label()} dropped (bitsandbytes needs CUDA; torchao is not installed)")
    offload = config.offload
    if offload.strategy != "none":
        # On a CPU nothing moves whatever the offload form, so one form stands for all: block level,
        # or leaf level where a compiled torchao model rules block level out (no streams on a CPU).
        quantization = update.get("quantization", config.quantization)
        torchao_compiled = quantization is not None and quantization.backend == "torchao" and config.compile is not None
        level = "leaf_level" if torchao_compiled else "block_level"
        cpu_form = Offload(strategy="group", offload_type=level, components=offload.components or ["transformer"])
        if offload.strategy in ("model", "sequential"):
            notes.append(f"{offload.strategy} offload -> {level.replace('_', '-')} group offload of the transformer ({offload.strategy} offload needs CUDA)")
        elif offload.use_stream or offload.offload_type != level:
            notes.append(f"{offload.label()} -> {cpu_form.label()} (a CPU moves nothing; no CUDA streams)")
        if cpu_form != offload:
            update["offload"] = cpu_form
    if config.compile is not None and config.compile.backend == "inductor":
        update["compile"] = config.compile.model_copy(update={"backend": "eager"})
        notes.append("compile backend inductor -> eager (inductor needs ~45 s per model on 2 CPU cores)")
    return config.model_copy(update=update), notes


def finish(config: Any, ctx: Any) -> tuple[Any, str | None]:
    """Run the rule engine's adjust rules on `config`; return it and the filter rule rejecting it, if any."""
    from advisor.plan.rules import finish_candidate, rules_of

    rejected = next((f.name for f in rules_of("filter") if f.apply(config, ctx)), None)
    return finish_candidate(config, ctx)[0], rejected


def seed_configs(device: str, dtype: str) -> list[tuple[str, str, Any]]:
    """The seed page's three combinations: nf4 transformer + T5; + compile; + compile + model offload."""
    from advisor.config import Compile, Offload, OptimizationConfig, Quantization

    nf4 = Quantization(backend="bitsandbytes_4bit", components=["transformer", "text_encoder_2"])
    base = OptimizationConfig(dtype=dtype, device=device, quantization=nf4)
    compiled = base.model_copy(update={"compile": Compile(components=["transformer"])})
    offloaded = compiled.model_copy(update={"offload": Offload(strategy="model")})
    return [
        ("quantization", "nf4 (transformer, T5)", base),
        ("quantization+compile", "nf4 + torch.compile (regional)", compiled),
        ("quantization+compile+model-offload", "nf4 + compile + model CPU offload", offloaded),
    ]


def offload_configs(device: str, dtype: str) -> list[tuple[str, str, Any]]:
    """bf16 without offload (the compute baseline), group offload of the transformer in four forms, sequential."""
    from advisor.config import Offload, OptimizationConfig

    base = OptimizationConfig(dtype=dtype, device=device)
    group = dict(strategy="group", components=["transformer"])
    return [
        ("none", "bf16, no offload (baseline)", base),
        ("group-block", "group offload, block level", base.model_copy(update={"offload": Offload(**group)})),
        ("group-block-stream", "group offload, block level, stream", base.model_copy(update={"offload": Offload(**group, use_stream=True, record_stream=True)})),
        ("group-leaf", "group offload, leaf level", base.model_copy(update={"offload": Offload(**group, offload_type="leaf_level")})),
        ("group-leaf-stream", "group offload, leaf level, stream", base.model_copy(update={"offload": Offload(**group, offload_type="leaf_level", use_stream=True, record_stream=True)})),
        ("sequential", "sequential CPU offload (every component)", base.model_copy(update={"offload": Offload(strategy="sequential")})),
    ]


# --- 5. running the plan within the budget ------------------------------------------------------------


class Kit:
    """The plan, the time budget, the results and their JSON."""

    def __init__(self, args: argparse.Namespace, log: Log) -> None:
        self.args = args
        self.log = log
        self.t0 = log.t0
        self.deadline = self.t0 + args.budget_s
        self.items: list[Item] = []
        self.measured: dict[str, Item] = {}  # config key -> the item that measured it
        # Set up by run(): the machine, the target, the model and the workload.
        self.machine: Any = None
        self.target: Any = None
        self.ctx: Any = None
        self.profile: Any = None
        self.workload: Any = None
        self.folder: Path | None = None
        self.model_bytes = 0
        self.device, self.dtype = "cuda", "bfloat16"
        self.step_points: tuple[int, ...] = (2, 4)
        self.repeats = 2
        self.bnb_ok, self.bnb_note, self.torchao = False, "", False
        self.budget_scaling_note = ""
        self.scaled_budget: Callable[[int], int] = lambda gb: gb * GIB
        self.ratios: list[float] = []  # measured wall / expected, for the correction
        self.data: dict[str, Any] = {
            "kit_version": KIT_VERSION,
            "mode": "dry-run" if args.dry_run else "gpu",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.t0)),
            "budget_s": args.budget_s,
            "parts": args.parts,
            "notes": [],
        }
        out = os.environ.get("OUT")
        self.json_path = args.json or (Path(out) / "gpu_kit.json" if out else args.work / "gpu_kit.json")
        self.md_path = self.json_path.with_suffix(".md")

    # time ---------------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.time() - SAFETY_S

    def correction(self) -> float:
        return min(max(statistics.median(self.ratios), 0.5), 5.0) if self.ratios else 1.0

    def expected_s(self, config: Any) -> float:
        """Seconds one `measure` of `config` should take: start-up, load, warm-up and timed calls."""
        from advisor.plan.estimate import estimate

        est = estimate(self.profile, self.workload, config, self.target)
        points, repeats = self.step_points, self.repeats
        steps = points[0] + repeats * sum(points)
        calls = 1 + repeats * len(points)
        fixed = max(est.latency_s - est.step_latency_s * self.workload.steps, 0.0)
        gpu = not self.args.dry_run
        startup = 10.0 if gpu else 3.0
        load = self.model_bytes / (1.5e9 if gpu else 3e8)
        if gpu and config.quantization is not None:
            load *= 1.5  # quantizing while loading
        compile_s = 0.0
        if config.compile is not None:
            compile_s = 60.0 if config.compile.backend == "inductor" else 1.0
        return (startup + load + steps * est.step_latency_s + calls * fixed + compile_s) * self.correction()

    def result_of(self, item_id: str, key: str) -> Any:
        """A measured value of an item ("latency_s", "per_step_s", ... or "measured_peak_bytes"), if any."""
        item = next((i for i in self.items if i.id == item_id), None)
        if item is None or item.status not in ("ok", "reused"):
            return None
        if key in item.result:
            return item.result[key]
        return (item.result.get("measurement") or {}).get(key)

    # output -------------------------------------------------------------------------------------
    def save(self) -> None:
        self.data["items"] = [item.to_dict() for item in self.items]
        self.data["elapsed_s"] = round(time.time() - self.t0, 1)
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(finite(self.data), indent=2, default=str, allow_nan=False) + "\n")
        tmp.replace(self.json_path)

    # measuring ----------------------------------------------------------------------------------
    def measure_item(self, item: Item) -> None:
        from advisor.plan.estimate import estimate
        from advisor.plan.rules import peak_bytes
        from advisor.run.measure import measure
        from advisor.run.tune import measured_peak

        config = item.config
        est = estimate(self.profile, self.workload, config, self.target)
        predicted = peak_bytes(est, self.target)
        item.result["estimate"] = {
            "peak_bytes": predicted,
            "peak_vram_bytes": est.peak_vram_bytes,
            "peak_ram_bytes": est.peak_ram_bytes,
            "peak_phase": est.peak_phase,
            "latency_s": est.latency_s,
            "step_latency_s": est.step_latency_s,
            "latency_breakdown": est.latency_breakdown,
            "weight_bytes": est.weight_bytes,
        }
        earlier = self.measured.get(config_key(config))
        if earlier is not None:
            item.status = "reused" if earlier.status == "ok" else earlier.status
            item.notes.append(f"same config as {earlier.id}: its measurement is reused")
            item.result["measurement"] = earlier.result.get("measurement")
            item.result["errors"] = earlier.result.get("errors")
            item.result["measured_peak_bytes"] = earlier.result.get("measured_peak_bytes")
            return
        expected = self.expected_s(config)
        item.result["expected_s"] = round(expected, 1)
        left = self.left()
        if left < expected:
            item.status = "skipped"
            item.notes.append(f"skipped: expected {expected:.0f} s, {max(left, 0):.0f} s left in the budget")
            self.log(f"{item.id}: {item.notes[-1]}")
            return
        timeout = min(left, max(3 * expected, 120.0))
        self.log(f"{item.id}: measuring {config.summary()} (expected {expected:.0f} s, timeout {timeout:.0f} s)")
        m = measure(self.folder, config, self.workload, timeout_s=timeout, step_points=self.step_points, repeats=self.repeats)
        item.status = m.status
        item.result["measurement"] = m.to_dict()
        if m.reason:
            item.notes.append(m.reason)
        raw_expected = expected / self.correction()
        if m.ok and m.wall_s:
            self.ratios.append(m.wall_s / raw_expected)
        measured = measured_peak(m, self.target)
        item.result["measured_peak_bytes"] = measured
        item.result["errors"] = errors(est, predicted, m, measured)
        self.measured[config_key(config)] = item
        lat = f"{m.latency_s:.2f} s" if m.latency_s is not None else "-"
        self.log(f"{item.id}: {m.status} in {m.wall_s:.0f} s: latency {lat}, peak {fmt_gib(measured)} (predicted {fmt_gib(predicted)})")

    def run_item(self, item: Item, work: Callable[[Item], None]) -> None:
        self.items.append(item)
        try:
            work(item)
        except Exception as exc:  # one item's failure is its result; the kit goes on
            item.status = "error"
            item.notes.append(f"{type(exc).__name__}: {str(exc)[:500]}")
            self.log(f"{item.id}: ERROR {item.notes[-1]}")
        self.save()


def errors(est: Any, predicted: int, m: Any, measured: int | None) -> dict[str, float | None]:
    """Relative errors of the estimate, (predicted - measured) / measured."""

    def rel(p: float | None, actual: float | None) -> float | None:
        return None if p is None or not actual else round((p - actual) / actual, 4)

    return {
        "peak": rel(predicted, measured),
        "peak_vs_reserved": rel(est.peak_vram_bytes, m.peak_vram_reserved_bytes) if m.peak_vram_reserved_bytes else None,
        "latency": rel(est.latency_s, m.latency_s),
        "per_step": rel(est.step_latency_s, m.per_step_s),
    }


def finite(value: Any) -> Any:
    """`value` with every infinite or NaN float replaced by None, so the results are strict JSON."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def fmt_gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f} GiB"


# --- the parts ---------------------------------------------------------------------------------------


def part_seed(kit: Kit) -> None:
    for name, label, config in seed_configs(kit.device, kit.dtype):
        item = Item(id=f"seed/{name}", part="seed", label=label, reference={"seed_page_rtx4090": SEED_PAGE[name]})
        kit.run_item(item, lambda item, config=config: _measure_mapped(kit, item, config, needs_bnb=True))
    lat = lambda item_id: kit.result_of(item_id, "latency_s")  # noqa: E731
    peak = lambda item_id: kit.result_of(item_id, "measured_peak_bytes")  # noqa: E731
    q, qc, qco = "seed/quantization", "seed/quantization+compile", "seed/quantization+compile+model-offload"
    ratios = {
        "compile_speedup": _ratio(lat(q), lat(qc)),
        "seed_page_compile_speedup": round(SEED_PAGE["quantization"]["latency_s"] / SEED_PAGE["quantization+compile"]["latency_s"], 4),
        "model_offload_peak_ratio": _ratio(peak(qco), peak(qc)),
        "seed_page_model_offload_peak_ratio": round(SEED_PAGE["quantization+compile+model-offload"]["memory_gb"] / SEED_PAGE["quantization+compile"]["memory_gb"], 4),
        "model_offload_latency_ratio": _ratio(lat(qco), lat(qc)),
        "seed_page_model_offload_latency_ratio": round(SEED_PAGE["quantization+compile+model-offload"]["latency_s"] / SEED_PAGE["quantization+compile"]["latency_s"], 4),
    }
    kit.data["seed_ratios"] = ratios


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a and b else None


def _measure_mapped(kit: Kit, item: Item, config: Any, *, needs_bnb: bool = False) -> None:
    """Finish `config` with the rules (after the CPU mapping in a dry run) and measure it."""
    if needs_bnb and not kit.args.dry_run and not kit.bnb_ok:
        item.status = "skipped"
        item.notes.append(f"skipped: bitsandbytes is unusable here ({kit.bnb_note})")
        item.config = config
        return
    if kit.args.dry_run:
        config, notes = cpu_equivalent(config, torchao=kit.torchao)
        item.notes += notes
    finished, rejected = finish(config, kit.ctx)
    item.config = finished
    if rejected == "offload-needs-an-accelerator" and kit.args.dry_run:
        item.notes.append("measured although the rule engine offers no offloading on a CPU: the dry run exercises the offload plumbing")
        rejected = None
    if rejected:
        item.status = "skipped"
        item.notes.append(f"skipped: rejected by rule {rejected}")
        return
    kit.measure_item(item)


def part_recommend(kit: Kit) -> None:
    from advisor.plan.recommend import make_recommendation

    for gb in RECOMMEND_BUDGETS_GB:
        budget = kit.scaled_budget(gb)
        item = Item(id=f"recommend/{gb}GB", part="recommend", label=f"advisor recommend --budget {gb}GB", budget_bytes=budget)

        def work(item: Item, budget: int = budget, gb: int = gb) -> None:
            if budget != gb * GIB:
                item.notes.append(f"budget {gb} GB scaled to {budget / GIB:.2f} GiB ({kit.budget_scaling_note})")
            result = make_recommendation(kit.profile, kit.workload, kit.target, machine=kit.machine, budget_bytes=budget)
            item.result["recommend"] = {
                "reasons": result.recommendation.reasons,
                "alternatives": [a.config.summary() for a in result.recommendation.alternatives],
                "candidates": result.recommendation.candidates,
            }
            if result.config is None:
                item.status = "nothing-fits"
                smallest = result.recommendation.smallest
                item.notes.append("nothing predicted to fit" + (f"; smallest: {smallest.config.summary()}" if smallest else ""))
                return
            config = result.config
            if kit.args.dry_run:
                config, notes = cpu_equivalent(config, torchao=kit.torchao)
                item.notes += notes
            item.config = config
            kit.measure_item(item)
            measured = item.result.get("measured_peak_bytes")
            if measured is not None:
                item.result["fits_budget"] = measured <= budget

        kit.run_item(item, work)


def part_tune(kit: Kit) -> None:
    from advisor.config import OptimizationConfig
    from advisor.run.tune import TuneSettings, run_study

    budget = kit.scaled_budget(TUNE_BUDGET_GB)
    item = Item(id=f"tune/{TUNE_BUDGET_GB}GB", part="tune", label=f"advisor tune --budget {TUNE_BUDGET_GB}GB", budget_bytes=budget)

    def work(item: Item) -> None:
        if budget != TUNE_BUDGET_GB * GIB:
            item.notes.append(f"budget {TUNE_BUDGET_GB} GB scaled to {budget / GIB:.2f} GiB ({kit.budget_scaling_note})")
        reserve = 0.0
        parts = kit.args.parts
        if not kit.args.dry_run and "offload" in parts and parts.index("offload") > parts.index("tune"):
            # Leave the offload calibration that comes next its baseline and two variants.
            reserve = sum(kit.expected_s(finish(c, kit.ctx)[0]) for _, _, c in offload_configs(kit.device, kit.dtype)[:3])
        available = kit.left() - reserve
        typical = statistics.median([kit.expected_s(i.config) for i in kit.items if i.config is not None and i.part != "tune"] or [60.0])
        trials = min(kit.args.tune_trials, int(available // typical)) if typical > 0 else 0
        item.result["expected_trial_s"] = round(typical, 1)
        if trials < 1:
            item.status = "skipped"
            item.notes.append(f"skipped: a trial is expected to take {typical:.0f} s, {max(available, 0):.0f} s left (after {reserve:.0f} s kept for offload)")
            kit.log(f"{item.id}: {item.notes[-1]}")
            return
        settings = TuneSettings(
            trials=trials,
            timeout_s=max(available / trials, 30.0),
            step_points=kit.step_points,
            repeats=kit.repeats,
            compile_choices=(False,) if kit.args.dry_run else (True, False),
        )
        if kit.args.dry_run:
            item.notes.append("tune searched without compile (inductor is too slow on 2 CPU cores)")
        storage = f"journal:{kit.args.work / 'tune-journal.log'}"
        study = f"gpu-kit-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        kit.log(f"{item.id}: optuna study {study}, {trials} trials, {settings.timeout_s:.0f} s each at most")
        on_trial = lambda r: kit.log(f"{item.id}: trial {r.trials[-1].number} {r.trials[-1].status}: {r.trials[-1].summary}") if r.trials else None  # noqa: E731
        result = run_study(str(kit.folder), kit.profile, kit.workload, kit.target, budget_bytes=budget,
                           packages=kit.machine.software.packages, storage=storage, study=study, settings=settings, on_trial=on_trial)
        ref_latency = kit.result_of("seed/quantization+compile", "latency_s")
        trials_out = []
        for trial in result.trials:
            record = {k: getattr(trial, k) for k in ("number", "summary", "status", "source", "feasible", "latency_s", "peak_bytes", "predicted_peak_bytes", "reason")}
            earlier = kit.measured.get(config_key(OptimizationConfig.model_validate(trial.config)))
            if earlier is not None and trial.latency_s and (earlier.result.get("measurement") or {}).get("latency_s"):
                record["kit_item"] = earlier.id
                record["repeat_latency_diff"] = round(trial.latency_s / earlier.result["measurement"]["latency_s"] - 1, 4)
            trials_out.append(record)
        item.result["tune"] = {"study": result.study, "space_size": result.space_size, "trials": trials_out, "advice": result.advice}
        if result.best is None:
            item.status = "nothing-fits"
            item.notes += result.advice
            return
        item.status = "ok"
        item.config = OptimizationConfig.model_validate(result.best.config)
        item.result["measurement"] = result.best.measurement
        item.result["measured_peak_bytes"] = result.best.peak_bytes
        item.result["latency_vs_seed_quantization_compile"] = _ratio(result.best.latency_s, ref_latency)
        if ref_latency is None:
            item.notes.append("seed/quantization+compile was not measured in this run: no relative latency")

    kit.run_item(item, work)


def part_offload(kit: Kit) -> None:
    for name, label, config in offload_configs(kit.device, kit.dtype):
        item = Item(id=f"offload/{name}", part="offload", label=label)
        kit.run_item(item, lambda item, config=config: _measure_mapped(kit, item, config))
    kit.data["offload_calibration"] = offload_calibration(kit)


def offload_calibration(kit: Kit) -> dict[str, Any]:
    """Per offload variant: measured extra seconds per step over the baseline, next to the estimate's
    transfer term, and the host->device rate that the measurement implies."""
    items = {i.id: i for i in kit.items if i.part == "offload"}
    base_step = kit.result_of("offload/none", "per_step_s")
    out: dict[str, Any] = {"baseline_per_step_s": base_step, "target_h2d_bytes_per_s": kit.target.h2d_bytes_per_s,
                           "calibrated_h2d_bytes_per_s": (kit.data.get("environment", {}).get("calibration") or {}).get("h2d_bytes_per_s")}
    for item_id, item in items.items():
        if item_id == "offload/none" or item.status not in ("ok", "reused"):
            continue
        m = item.result.get("measurement") or {}
        est = item.result.get("estimate") or {}
        extra = m.get("per_step_s") - base_step if m.get("per_step_s") is not None and base_step is not None else None
        moved = (est.get("weight_bytes") or {}).get("transformer")
        row = {
            "measured_extra_per_step_s": extra,
            "estimated_step_transfer_s": (est.get("latency_breakdown") or {}).get("step_transfer_s"),
            "moved_bytes_per_step": moved,
            "implied_bytes_per_s": moved / extra if moved and extra and extra > 0 else None,
            "measured_peak_bytes": item.result.get("measured_peak_bytes"),
            "predicted_peak_bytes": est.get("peak_bytes"),
        }
        if row["implied_bytes_per_s"] and kit.target.h2d_bytes_per_s:
            row["implied_bandwidth_factor"] = round(row["implied_bytes_per_s"] / kit.target.h2d_bytes_per_s, 4)
        out[item_id] = row
    return out


# --- 6. the table ------------------------------------------------------------------------------------


def table(kit: Kit) -> str:
    gpu = not kit.args.dry_run
    peak_name = "alloc GiB" if gpu else "RSS GiB"
    header = ["item", "config", "status", "latency s (est)", f"{peak_name} (est, err)", "reserved GiB", "wall s"]
    rows = []
    for item in kit.items:
        m = item.result.get("measurement") or {}
        est = item.result.get("estimate") or {}
        err = (item.result.get("errors") or {}).get("peak")
        latency = m.get("latency_s")
        lat = (f"{latency:.2f}" if latency is not None else "-") + (f" ({est['latency_s']:.2f})" if est.get("latency_s") is not None else "")
        peak = item.result.get("measured_peak_bytes")
        peak_text = f"{peak / GIB:.2f}" if peak else "-"
        if est.get("peak_bytes"):
            peak_text += f" ({est['peak_bytes'] / GIB:.2f}" + (f", {err:+.0%})" if err is not None else ")")
        reserved = m.get("peak_vram_reserved_bytes")
        summary = item.config.summary() if item.config is not None else item.label
        wall = m.get("wall_s")
        rows.append([item.id, summary, item.status, lat, peak_text, f"{reserved / GIB:.2f}" if reserved else "-", f"{wall:.0f}" if wall else "-"])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]
    return "\n".join(out)


def findings_block(kit: Kit) -> str:
    """A few lines on what the seed, tune and offload parts found, against the seed page."""
    lines = ["Findings:"]
    ratios = kit.data.get("seed_ratios") or {}
    if ratios.get("compile_speedup"):
        lines.append(f"- compile speed-up (nf4): {ratios['compile_speedup']:.2f}x (seed page, RTX 4090: {ratios['seed_page_compile_speedup']:.2f}x)")
    if ratios.get("model_offload_peak_ratio"):
        lines.append(f"- model offload peak / no offload (nf4 + compile): {ratios['model_offload_peak_ratio']:.2f} (seed page: {ratios['seed_page_model_offload_peak_ratio']:.2f}); "
                     f"latency {ratios.get('model_offload_latency_ratio') or float('nan'):.2f} (seed page: {ratios['seed_page_model_offload_latency_ratio']:.2f})")
    tune = next((i for i in kit.items if i.part == "tune"), None)
    if tune is not None and tune.result.get("latency_vs_seed_quantization_compile"):
        lines.append(f"- tune's pick ({tune.config.summary()}) runs at {tune.result['latency_vs_seed_quantization_compile']:.2f}x the latency of the seed's nf4 + compile")
    for item_id, row in (kit.data.get("offload_calibration") or {}).items():
        if isinstance(row, dict) and row.get("implied_bytes_per_s"):
            lines.append(f"- {item_id}: +{row['measured_extra_per_step_s']:.3f} s/step over no offload (estimate {row['estimated_step_transfer_s'] or 0:.3f} s), "
                         f"{row['implied_bytes_per_s'] / 1e9:.1f} GB/s moved")
    errors_by_part = [i.result["errors"]["peak"] for i in kit.items if (i.result.get("errors") or {}).get("peak") is not None and i.status == "ok"]
    if errors_by_part:
        lines.append(f"- estimate peak error over {len(errors_by_part)} measured configs: median {statistics.median(errors_by_part):+.0%}, "
                     f"worst {max(errors_by_part, key=abs):+.0%}")
    return "\n".join(lines)


def notes_block(kit: Kit) -> str:
    lines = []
    for item in kit.items:
        for note in item.notes:
            lines.append(f"- {item.id}: {note}")
    for note in kit.data["notes"]:
        lines.append(f"- {note}")
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The advisor's GPU kit (docs/gpu-kit.md).")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny pipeline, CPU-valid equivalents: checks the plumbing")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget in seconds, installation included (default 480)")
    parser.add_argument("--depth", type=float, default=0.25, help="share of FLUX.1-dev's transformer blocks and T5 layers to build (default 0.25; 1 = full size)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, run in this order (default {','.join(PARTS)})")
    parser.add_argument("--tune-trials", type=int, default=None, help="trial cap for the tune study (default 3; 1 with --dry-run)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "advisor-gpu-kit", help="models, caches, the study (default: %(default)s)")
    parser.add_argument("--wheels", type=Path, default=WHEELS, help="carried wheels (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="results file (default: $OUT/gpu_kit.json, else WORK/gpu_kit.json)")
    parser.add_argument("--no-install", action="store_true", help="use the installed packages as they are")
    parser.add_argument("--internal", nargs=2, metavar=("WHAT", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    if args.tune_trials is None:
        args.tune_trials = 1 if args.dry_run else 3
    if not 0 < args.depth <= 1:
        parser.error(f"--depth: {args.depth} must be in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.internal:
        what, spec = args.internal
        sys.path.insert(0, str(REPO))
        result = {"build": _build_child, "environment": _environment_child}[what](json.loads(spec))
        print(json.dumps(result, default=str))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log = Log(float(os.environ.get("ADVISOR_GPU_KIT_T0", time.time())))
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        log.path = Path(out) / "gpu_kit.log"
    install = bootstrap(args, log)  # re-runs this script after installing, unless there is nothing to do
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    args.work.mkdir(parents=True, exist_ok=True)
    # The kit's own caches (calibration, optuna's default storage) stay in the work folder.
    os.environ["XDG_CACHE_HOME"] = str(args.work / "cache")
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in (str(REPO), *os.environ.get("PYTHONPATH", "").split(os.pathsep)) if p))
    kit = Kit(args, log)
    kit.data["install"] = install
    try:
        return run(kit)
    finally:
        kit.save()


def run(kit: Kit) -> int:
    args, log = kit.args, kit.log
    from advisor.plan.estimate import estimate
    from advisor.plan.rules import Context, peak_bytes
    from advisor.probe.hardware import probe_machine
    from advisor.probe.models import load_profile, profile_from_folder
    from advisor.probe.target import target_from_probe
    from advisor.probe.workload import make_workload

    kit.machine = probe_machine()
    gpu = not args.dry_run
    if gpu and not kit.machine.gpus:
        log("no CUDA GPU found: run with --dry-run on a CPU machine")
        kit.data["notes"].append("no CUDA GPU found; nothing measured")
        return 2
    # The target is read before the environment child calibrates, so estimates use the datasheet/NVML figures.
    kit.target = target_from_probe(kit.machine)
    kit.device, kit.dtype = ("cuda", "bfloat16") if gpu else ("cpu", "float32")
    kit.step_points, kit.repeats = ((2, 4), 2) if gpu else ((1, 2), 1)

    bnb_env, kit.bnb_note = (None, "dry run: not used") if not gpu else bitsandbytes_library(torch_cuda_version())
    if bnb_env:
        os.environ["BNB_CUDA_VERSION"] = bnb_env
    log(f"target: {kit.target.name} ({kit.target.source}); bitsandbytes: {kit.bnb_note}")
    env_spec = {"bnb_smoke": gpu, "calibrate_s": 0.5 if gpu else 0.2}
    child_env = {**os.environ, "XDG_CACHE_HOME": str(args.work / "calibration-cache")}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--internal", "environment", json.dumps(env_spec)],
                          capture_output=True, text=True, timeout=180, env=child_env)
    environment = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 and done.stdout.strip() else {"error": done.stderr[-800:]}
    environment["bitsandbytes_library"] = kit.bnb_note
    kit.data["environment"] = environment
    kit.data["target"] = kit.target.to_dict()
    kit.bnb_ok = bool(gpu and (environment.get("bitsandbytes_smoke") or {}).get("ok"))
    kit.torchao = bool(environment.get("torchao"))
    if environment.get("torchao_error"):  # installed but broken: plan as if absent
        kit.machine.software.packages["torchao"] = None
    if gpu and not kit.bnb_ok:
        kit.bnb_note = (environment.get("bitsandbytes_smoke") or {}).get("error") or environment.get("bitsandbytes_error") or kit.bnb_note
        kit.machine.software.packages["bitsandbytes"] = None  # recommend and tune then leave it out
        kit.data["notes"].append(f"bitsandbytes unusable: {kit.bnb_note}; seed items skipped, recommend/tune plan without it")
    log("environment: " + ", ".join(f"{k} {environment.get(k)}" for k in ("python", "torch", "cuda_runtime", "gpu", "diffusers", "bitsandbytes", "optuna")))
    kit.save()

    if gpu:
        try:
            kit.folder, model_info = ensure_flux_dev_shaped(args.work, args.depth, log, timeout_s=max(kit.left(), 60))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            log(f"no model to measure: {exc}")
            kit.data["notes"].append(f"building the FLUX.1-dev-shaped pipeline failed: {exc}")
            return 1
    else:
        from advisor.testing import build_tiny_flux

        started = time.time()
        kit.folder = build_tiny_flux(args.work / "tiny-flux")
        model_info = {"folder": str(kit.folder), "fixture": "advisor.testing.build_tiny_flux (scale 1)", "build_s": round(time.time() - started, 2),
                      "bytes": folder_bytes(kit.folder)}
    kit.model_bytes = model_info["bytes"]
    kit.profile = profile_from_folder(kit.folder, model_id=f"FLUX.1-dev-shaped (depth {args.depth:g})" if gpu else "tiny-flux")
    kit.workload = make_workload(kit.profile) if gpu else make_workload(kit.profile, height=32, width=32, steps=4)
    model_info["parameters"] = {c.name: c.parameters for c in kit.profile.components}
    kit.data["model"] = model_info
    kit.data["workload"] = kit.workload.to_dict()

    # Budgets are for full-size FLUX.1-dev: scale them by the estimate's peak of the seed's nf4
    # combination on the model built over the full-size catalog model (same target).
    full = load_profile("black-forest-labs/FLUX.1-dev")
    kit.ctx = Context(kit.profile, kit.workload, kit.target, kit.machine.software.packages, 1 << 62)
    if gpu and args.depth < 1:
        nf4 = finish(seed_configs(kit.device, kit.dtype)[0][2], kit.ctx)[0]
        here = peak_bytes(estimate(kit.profile, kit.workload, nf4, kit.target), kit.target)
        scale = here / peak_bytes(estimate(full, make_workload(full), nf4, kit.target), kit.target)
        kit.budget_scaling_note = f"x{scale:.3f}: the estimate's nf4 peak at depth {args.depth:g} over full size"
        kit.scaled_budget = lambda gb: int(gb * GIB * scale)
    elif gpu:
        kit.budget_scaling_note = "full size: budgets as given"
        kit.scaled_budget = lambda gb: gb * GIB
    else:
        from advisor.plan.rules import default_budget

        kit.budget_scaling_note = "dry run: the CPU's default budget (available RAM - 10%) replaces the GPU budgets"
        kit.scaled_budget = lambda gb: default_budget(kit.target)
    kit.data["budget_scaling"] = {"note": kit.budget_scaling_note, **{f"{gb}GB": kit.scaled_budget(gb) for gb in (*RECOMMEND_BUDGETS_GB, TUNE_BUDGET_GB)}}
    kit.save()

    runners = {"seed": part_seed, "recommend": part_recommend, "tune": part_tune, "offload": part_offload}
    for part in args.parts:
        log(f"--- {part} ({kit.left():.0f} s left)")
        runners[part](kit)
        kit.save()

    kit.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    kit.data["correction"] = kit.correction()
    text = table(kit)
    notes = notes_block(kit)
    findings = findings_block(kit)
    header = (f"GPU kit ({kit.data['mode']}), {environment.get('gpu') or 'CPU'}, torch {environment.get('torch')}, "
              f"model {kit.profile.model_id}, workload {kit.workload.label()}, {time.time() - kit.t0:.0f} s of {args.budget_s:.0f} s")
    legend = ("latency: extrapolated to the workload's steps (estimate in brackets); peak: "
              + ("torch.cuda.max_memory_allocated" if gpu else "the trial process's peak RSS") + " (estimate, its error)")
    kit.md_path.write_text(f"Notes:\n{notes}\n\n{findings}\n\n{header}\n{legend}\n\n{text}\n")
    log(f"results: {kit.json_path} and {kit.md_path}")
    # The table goes last: it is what the end of the output shows.
    print(f"\nNotes:\n{notes}\n\n{findings}\n\n{header}\n{legend}\n{text}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
