"""The GPU kit: measure the advisor's GPU paths on a briefly lent H100/H200 with no network.

One command does everything (docs/gpu-kit.md has the exact `run` call)::

    bash benchmarks/gpu/run.sh [--budget-s 480] [--depth 0.25] [--parts seed,recommend,tune,offload,attention]
    bash benchmarks/gpu/run.sh --dry-run      # the same code path on this CPU, tiny pipeline, no time budget

1. **Install** (`kit.bootstrap`): a virtual environment over this Python's packages
   (``--system-site-packages``), pip installing the project into it (``-e .``) from the carried
   wheels in ``benchmarks/gpu/wheels`` (``fetch_wheels.py``) with ``--no-index``; then the kit
   re-runs itself with the environment's Python. Torch is never reinstalled.
2. **Build** a FLUX.1-dev-shaped pipeline with random weights (`kit.flux_shaped`), on the GPU,
   in bf16, saved once under ``--work`` and reused.
3. **Measure**, each candidate in its own process, most valuable first (`kit.parts`), within
   ``--budget-s`` (`kit.plan`).
4. **Report** (`kit.report`): a table last on stdout; everything as JSON in ``$OUT/gpu_kit.json``
   (written after every item, so a run cut short still returns what it measured), the table as
   ``$OUT/gpu_kit.md`` and the log as ``$OUT/gpu_kit.log``.

``--dry-run`` runs the same plan on the CPU with ``advisor.testing.build_tiny_flux`` and CPU-valid
equivalents of the GPU-only options, each mapping noted in the results (`kit.advisor_api.cpu_equivalent`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kit import GIB, REPO, RUN_KIT, WHEELS, advisor_api, bootstrap
from kit.flux_shaped import build_child, ensure_flux_dev_shaped, folder_bytes
from kit.machine import bitsandbytes_library, environment_child, torch_cuda_version
from kit.parts import PARTS, RECOMMEND_BUDGETS_GB, RUNNERS, TUNE_BUDGET_GB
from kit.plan import Kit
from kit.report import Log, final_report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The advisor's GPU kit (docs/gpu-kit.md).")
    parser.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny pipeline, CPU-valid equivalents: checks the plumbing"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-clock budget in seconds, installation included (default 480; none with --dry-run, "
        "which checks plumbing on a machine that may be busy)",
    )
    parser.add_argument(
        "--depth",
        type=float,
        default=0.25,
        help="share of FLUX.1-dev's transformer blocks and T5 layers to build (default 0.25; 1 = full size)",
    )
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated, run in this order (default {','.join(PARTS)})"
    )
    parser.add_argument(
        "--tune-trials", type=int, default=None, help="trial cap for the tune study (default 3; 1 with --dry-run)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "advisor-gpu-kit",
        help="the environment, models, caches, the study (default: %(default)s)",
    )
    parser.add_argument(
        "--wheels", type=Path, default=WHEELS, help="carried wheels, pip's --find-links (default: %(default)s)"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="results file (default: $OUT/gpu_kit.json, else WORK/gpu_kit.json)"
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="use the running Python's packages as they are (no environment, no pip)",
    )
    parser.add_argument("--internal", nargs=2, metavar=("WHAT", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the re-run inside the environment
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(args.parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    if args.budget_s is None and not args.dry_run:
        args.budget_s = 480.0
    if args.tune_trials is None:
        args.tune_trials = 1 if args.dry_run else 3
    if not 0 < args.depth <= 1:
        parser.error(f"--depth: {args.depth} must be in (0, 1]")
    args.work = args.work.resolve()
    return args


def install(args: argparse.Namespace, kit: Kit) -> bool:
    """Make the environment and re-run there (never returns then); True when the kit may go on here."""
    venv = bootstrap.in_environment()
    if venv is not None:  # the re-run: the first run left its record in the environment
        kit.data["install"] = bootstrap.recorded_install(venv)
        return True
    if args.no_install:
        kit.data["install"] = {"result": "not installed: --no-install", "python": sys.executable}
        sys.path.insert(0, str(REPO))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        return True
    venv = args.work / "venv"
    kit.log(
        f"installing into {venv} with pip (wheels: {args.wheels if args.wheels.is_dir() else 'none, folder absent'})"
    )
    try:
        record = bootstrap.make_environment(venv, args.wheels, log=kit.log)
    except (bootstrap.BootstrapError, OSError, subprocess.SubprocessError) as exc:
        kit.log(f"install failed: {exc}")
        kit.data["install"] = {"venv": str(venv), "error": str(exc)}
        kit.data["notes"].append(f"install failed, nothing measured: {exc}")
        return False
    kit.log(f"{record.result} in {record.install_s} s" + "".join(f"\n  pip: {w}" for w in record.pip_warnings))
    bootstrap.rerun_in(venv, record, RUN_KIT, args.argv, kit.t0)
    raise AssertionError("unreachable: rerun_in replaces this process")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.internal:
        what, spec = args.internal
        result = {"build": build_child, "environment": environment_child}[what](json.loads(spec))
        print(json.dumps(result, default=str))
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log = Log(float(os.environ.get(bootstrap.T0_VARIABLE, time.time())))
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        log.path = Path(out) / "gpu_kit.log"
    args.work.mkdir(parents=True, exist_ok=True)
    kit = Kit(args, log)
    try:
        if not install(args, kit):
            return 1
        # The kit's own caches (calibration, optuna's default storage) stay in the work folder.
        os.environ["XDG_CACHE_HOME"] = str(args.work / "cache")
        return run(kit)
    finally:
        kit.save()


def run(kit: Kit) -> int:
    """Probe, check the environment, build the model, scale the budgets, run the parts, report."""
    args, log = kit.args, kit.log
    gpu = not args.dry_run
    kit.machine = advisor_api.probe_machine()
    kit.packages = advisor_api.installed_packages(kit.machine)
    if gpu and not advisor_api.has_gpu(kit.machine):
        log("no CUDA GPU found: run with --dry-run on a CPU machine")
        kit.data["notes"].append("no CUDA GPU found; nothing measured")
        return 2
    # The target is read before the environment child calibrates, so estimates use the datasheet/NVML figures.
    kit.target = advisor_api.target_from_probe(kit.machine)
    kit.data["target"] = advisor_api.target_record(kit.target)
    kit.device, kit.dtype = ("cuda", "bfloat16") if gpu else ("cpu", "float32")
    # A dry run checks plumbing, not timings: one timed round, whatever its spread.
    kit.step_points, kit.repeats, kit.max_rounds = ((2, 4), 2, 4) if gpu else ((1, 2), 1, 1)
    environment = check_environment(kit)

    if gpu:
        try:
            kit.folder, model_info = ensure_flux_dev_shaped(args.work, args.depth, log, timeout_s=max(kit.left(), 60))
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            log(f"no model to measure: {exc}")
            kit.data["notes"].append(f"building the FLUX.1-dev-shaped pipeline failed: {exc}")
            return 1
    else:
        started = time.time()
        kit.folder = advisor_api.build_tiny_flux(args.work / "tiny-flux")
        model_info = {
            "folder": str(kit.folder),
            "fixture": "advisor.testing.build_tiny_flux (scale 1)",
            "build_s": round(time.time() - started, 2),
            "bytes": folder_bytes(kit.folder),
        }
    kit.model_bytes = model_info["bytes"]
    kit.profile = advisor_api.profile_from_folder(
        kit.folder, f"FLUX.1-dev-shaped (depth {args.depth:g})" if gpu else "tiny-flux"
    )
    kit.workload = (
        advisor_api.make_workload(kit.profile)
        if gpu
        else advisor_api.make_workload(kit.profile, height=32, width=32, steps=4)
    )
    described = advisor_api.describe(kit.profile, kit.workload)
    kit.data["model"] = {**model_info, "model_id": described["model_id"], "parameters": described["parameters"]}
    kit.data["workload"] = described["workload"]
    kit.data["workload_label"] = described["workload_label"]
    kit.ctx = advisor_api.planning_context(kit.profile, kit.workload, kit.target, kit.packages)
    scale_budgets(kit)
    kit.save()

    for part in args.parts:
        log(f"--- {part} ({kit.left():.0f} s left)")
        RUNNERS[part](kit)
        kit.save()

    kit.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    kit.data["correction"] = kit.correction()
    text = final_report(kit, environment)
    kit.md_path.write_text(text)
    log(f"results: {kit.json_path} and {kit.md_path}")
    print("\n" + text, end="", flush=True)  # the table goes last: it is what the end of the output shows
    return 0


def check_environment(kit: Kit) -> dict:
    """Versions, the GPU, bitsandbytes and the calibration, from a child process; what it implies for the plan."""
    gpu = not kit.args.dry_run
    bnb_env, kit.bnb_note = bitsandbytes_library(torch_cuda_version()) if gpu else (None, "dry run: not used")
    if bnb_env:
        os.environ["BNB_CUDA_VERSION"] = bnb_env
    kit.log(f"target: {kit.data['target']['name']} ({kit.data['target']['source']}); bitsandbytes: {kit.bnb_note}")
    spec = {"bnb_smoke": gpu, "calibrate_s": 0.5 if gpu else 0.2}
    child_env = {**os.environ, "XDG_CACHE_HOME": str(kit.args.work / "calibration-cache")}
    done = subprocess.run(
        [sys.executable, str(RUN_KIT), "--internal", "environment", json.dumps(spec)],
        capture_output=True,
        text=True,
        timeout=180,
        env=child_env,
    )
    environment = (
        json.loads(done.stdout.strip().splitlines()[-1])
        if done.returncode == 0 and done.stdout.strip()
        else {"error": done.stderr[-800:]}
    )
    environment["bitsandbytes_library"] = kit.bnb_note
    kit.data["environment"] = environment
    kit.bnb_ok = bool(gpu and (environment.get("bitsandbytes_smoke") or {}).get("ok"))
    kit.torchao = bool(environment.get("torchao"))
    if environment.get("torchao_error"):  # installed but broken: plan as if absent
        kit.packages["torchao"] = None
    if gpu and not kit.bnb_ok:
        kit.bnb_note = (
            (environment.get("bitsandbytes_smoke") or {}).get("error")
            or environment.get("bitsandbytes_error")
            or kit.bnb_note
        )
        kit.packages["bitsandbytes"] = None  # recommend and tune then leave it out
        kit.data["notes"].append(
            f"bitsandbytes unusable: {kit.bnb_note}; seed items skipped, recommend/tune plan without it"
        )
    kit.log(
        "environment: "
        + ", ".join(
            f"{k} {environment.get(k)}"
            for k in ("python", "torch", "cuda_runtime", "gpu", "diffusers", "bitsandbytes", "optuna")
        )
    )
    kit.save()
    return environment


def scale_budgets(kit: Kit) -> None:
    """Budgets are for full-size FLUX.1-dev: scale them by the estimate's peak of the seed's nf4
    combination on the model built over the full-size catalog model (same target)."""
    gpu = not kit.args.dry_run
    if gpu and kit.args.depth < 1:
        nf4 = advisor_api.finish(advisor_api.seed_configs(kit.device, kit.dtype)[0][2], kit.ctx)[0]
        full = advisor_api.full_size_profile()
        here = advisor_api.estimate_record(kit.profile, kit.workload, nf4, kit.target)["peak_bytes"]
        scale = (
            here / advisor_api.estimate_record(full, advisor_api.make_workload(full), nf4, kit.target)["peak_bytes"]
        )
        kit.budget_scaling_note = f"x{scale:.3f}: the estimate's nf4 peak at depth {kit.args.depth:g} over full size"
        kit.scaled_budget = lambda gb: int(gb * GIB * scale)
    elif gpu:
        kit.budget_scaling_note = "full size: budgets as given"
        kit.scaled_budget = lambda gb: gb * GIB
    else:
        kit.budget_scaling_note = "dry run: the CPU's default budget (available RAM - 10%) replaces the GPU budgets"
        kit.scaled_budget = lambda gb: advisor_api.default_budget(kit.target)
    kit.data["budget_scaling"] = {
        "note": kit.budget_scaling_note,
        **{f"{gb}GB": kit.scaled_budget(gb) for gb in (*RECOMMEND_BUDGETS_GB, TUNE_BUDGET_GB)},
    }


if __name__ == "__main__":
    sys.exit(main())
