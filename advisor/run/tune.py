"""`advisor tune`: an optuna study that measures real candidates and keeps the fastest that fits.

The search space is the rule engine's: quantization choice x offload strategy x compile, restricted
to what is valid on the target. The rule engine's pick and alternatives are enqueued first; the
estimate skips candidates predicted far over budget (``prune=False`` measures them anyway); every
other trial runs in a fresh subprocess (`advisor.run.measure`). A trial's peak memory against the budget
is its constraint (``trial.set_constraint``): over budget, out of memory, crash and timeout are
infeasible trials with their reason, and the study goes on.

The study lives in optuna storage (SQLite by default, see `default_storage`), so running the same
command again resumes it, and several processes or machines can work one study through a journal
file or PostgreSQL.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from advisor import __version__
from advisor.config import Compile, LayerwiseCasting, Offload, OptimizationConfig, Provenance, Quantization
from advisor.errors import TuneError, UsageError
from advisor.paths import advisor_cache_dir
from advisor.plan.estimate import estimate
from advisor.plan.rules import (
    Context,
    candidate,
    default_budget,
    finish_candidate,
    offload_choices,
    peak_bytes,
    quantization_choices,
    recommend,
    rules_of,
)
from advisor.probe.models import ModelProfile
from advisor.probe.target import TargetHardware
from advisor.probe.workload import Workload
from advisor.run.measure import Measurement, measure
from advisor.units import format_size

# Candidates predicted beyond budget x this are skipped without measuring (unless prune=False).
PRUNE_MARGIN = 1.25


def default_storage() -> str:
    """SQLite file under the user cache: ``~/.cache/advisor/studies.db`` (honours XDG_CACHE_HOME)."""
    base = advisor_cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / 'studies.db'}"


def open_storage(url: str):
    """An optuna storage from a URL: ``sqlite:///...``, ``postgresql://...``, ``mysql://...``, or
    ``journal:PATH`` for a journal file that several processes may share."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    if not re.match(r"^[a-z0-9+]+://", url):
        raise UsageError(f"--storage: {url!r} is not a storage URL; use sqlite:///PATH, journal:PATH or postgresql://...")
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
        except Exception as exc:  # driver missing, server unreachable, bad URL
            # Workers opening an empty database together race on CREATE TABLE; the loser retries.
            if type(exc).__name__ in {"IntegrityError", "ProgrammingError"} and attempt < 4:
                time.sleep(0.5 * (attempt + 1))
                continue
            raise TuneError(f"--storage: cannot open {shown_storage(url)!r} ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None


def shown_storage(url: str) -> str:
    """The storage URL as it may be printed: a database password replaced by ***."""
    if "://" not in url or "@" not in url:
        return url
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def study_name(profile: ModelProfile, workload: Workload, target: TargetHardware, budget_bytes: int) -> str:
    """Same model, workload, machine and budget -> same study, so re-running resumes it."""
    key = json.dumps([profile.model_id, workload.to_dict(), target.name, target.device, budget_bytes], sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(profile.model_id).name).strip("-").lower()
    return f"{slug}-{workload.kind}-{format_size(budget_bytes).replace(' ', '')}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


# --- the search space ---------------------------------------------------------------------------


@dataclass
class SearchSpace:
    """Named choices per dimension; a trial picks one name per dimension."""

    quantization: dict[str, tuple[Quantization | None, LayerwiseCasting | None]]
    offload: dict[str, Offload]
    compile: list[bool]

    def config(self, params: dict[str, Any], ctx: Context) -> tuple[OptimizationConfig, str | None]:
        """The finished config for a trial's params, and the filter rule that rejects it (if any)."""
        quantization, casting = self.quantization[params["quantization"]]
        config = candidate(ctx.profile, ctx.target, quantization, casting, self.offload[params["offload"]], params["compile"])
        rejected = next((f.name for f in rules_of("filter") if f.apply(config, ctx)), None)
        return finish_candidate(config, ctx)[0], rejected

    def params_of(self, config: OptimizationConfig) -> dict[str, Any] | None:
        """The params that produce `config` (to enqueue the rule engine's picks)."""
        quantization = next(
            (n for n, (q, c) in self.quantization.items() if q == config.quantization and c == config.layerwise_casting), None
        )
        offload = next((n for n, o in self.offload.items() if o == config.offload), None)
        compiled = config.compile is not None
        if quantization is None or offload is None or compiled not in self.compile:
            return None
        return {"quantization": quantization, "offload": offload, "compile": compiled}

    def size(self) -> int:
        return len(self.quantization) * len(self.offload) * len(self.compile)

    def points(self) -> list[dict[str, Any]]:
        return [
            {"quantization": q, "offload": o, "compile": c}
            for q, o, c in itertools.product(self.quantization, self.offload, self.compile)
        ]


def _quantization_name(quantization: Quantization | None, casting: LayerwiseCasting | None) -> str:
    if quantization:
        return f"{quantization.kind}[{'+'.join(quantization.components)}]"
    if casting:
        return f"fp8-storage[{'+'.join(casting.components)}]"
    return "none"


def _offload_name(offload: Offload) -> str:
    if offload.strategy != "group":
        return offload.strategy
    parts = ["group", "leaf" if offload.offload_type == "leaf_level" else f"block{offload.num_blocks_per_group}"]
    parts += [name for name, on in (("stream", offload.use_stream), ("lowram", offload.low_cpu_mem_usage), ("disk", bool(offload.offload_to_disk_path))) if on]
    return "-".join(parts)


def search_space(ctx: Context, *, compile_choices: tuple[bool, ...] = (True, False)) -> SearchSpace:
    """The rule engine's candidate dimensions, without the choices no candidate can use here."""
    quantization = {}
    for q, c in quantization_choices(ctx.profile):
        probe = OptimizationConfig(device=ctx.target.device, quantization=q, layerwise_casting=c, compile=Compile())
        if not any(f.apply(probe, ctx) for f in rules_of("filter")):
            quantization[_quantization_name(q, c)] = (q, c)
    offload = {}
    for o in offload_choices(ctx.target):
        if not any(f.apply(OptimizationConfig(device=ctx.target.device, offload=o), ctx) for f in rules_of("filter")):
            offload[_offload_name(o)] = o
    return SearchSpace(quantization, offload, list(compile_choices))


# --- trials -------------------------------------------------------------------------------------


@dataclass
class TrialRecord:
    """One trial as the results table shows it."""

    number: int
    summary: str
    status: str  # ok | over-budget | oom | crash | timeout | skipped | invalid
    source: str  # measured | estimate | repeat
    feasible: bool
    latency_s: float | None
    peak_bytes: int | None
    predicted_peak_bytes: int | None
    reason: str | None
    config: dict[str, Any]
    measurement: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TuneResult:
    study: str
    storage: str
    budget_bytes: int
    trials: list[TrialRecord]
    best: TrialRecord | None
    config: OptimizationConfig | None
    space_size: int
    advice: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "study": self.study,
            "storage": self.storage,
            "budget_bytes": self.budget_bytes,
            "space_size": self.space_size,
            "fits": self.best is not None,
            "best": self.best.to_dict() if self.best else None,
            "config": self.config.model_dump(mode="json", exclude_none=True) if self.config else None,
            "trials": [t.to_dict() for t in self.trials],
            "advice": self.advice,
        }


@dataclass
class TuneSettings:
    trials: int = 8
    timeout_s: float = 900.0  # per trial
    prune: bool = True
    step_points: tuple[int, ...] = (2, 4)
    repeats: int = 2
    memory_limit_bytes: int | None = None  # RLIMIT_AS for each trial process (tests provoke OOM)
    seed: int = 0
    compile_choices: tuple[bool, ...] = (True, False)


def _objective(space: SearchSpace, ctx: Context, model: str, settings: TuneSettings) -> Callable:
    def objective(trial) -> float:
        params = {
            "quantization": trial.suggest_categorical("quantization", list(space.quantization)),
            "offload": trial.suggest_categorical("offload", list(space.offload)),
            "compile": trial.suggest_categorical("compile", space.compile),
        }
        config, rejected = space.config(params, ctx)
        predicted = estimate(ctx.profile, ctx.workload, config, ctx.target)
        predicted_peak = peak_bytes(predicted, ctx.target)
        key = config.model_dump_json()
        trial.set_user_attr("config", json.loads(key))
        trial.set_user_attr("summary", config.summary())
        trial.set_user_attr("predicted_peak_bytes", predicted_peak)
        trial.set_user_attr("predicted_latency_s", predicted.latency_s)

        def finish(status: str, source: str, violation: float, latency: float, reason: str | None, m: Measurement | None = None) -> float:
            trial.set_user_attr("status", status)
            trial.set_user_attr("source", source)
            trial.set_user_attr("reason", reason)
            if m is not None:
                trial.set_user_attr("measurement", m.to_dict())
            trial.set_constraint("peak_over_budget", violation)
            return latency

        if rejected:
            return finish("invalid", "estimate", 1.0, predicted.latency_s, f"rejected by rule {rejected}")
        if settings.prune and predicted_peak > ctx.budget_bytes * PRUNE_MARGIN:
            reason = f"predicted peak {format_size(predicted_peak)} is far over the {format_size(ctx.budget_bytes)} budget"
            return finish("skipped", "estimate", float(predicted_peak - ctx.budget_bytes), predicted.latency_s, reason)
        earlier = _measured_before(trial.study, key, trial.number)
        if earlier is not None:  # the sampler proposed a configuration already measured: reuse it
            m = Measurement(**earlier.user_attrs["measurement"])
            status, violation, reason = _judge(m, ctx)
            return finish(status, "repeat", violation, m.latency_s or predicted.latency_s, f"same as trial {earlier.number}" + (f"; {reason}" if reason else ""), m)
        m = measure(
            model,
            config,
            ctx.workload,
            timeout_s=settings.timeout_s,
            step_points=settings.step_points,
            repeats=settings.repeats,
            memory_limit_bytes=settings.memory_limit_bytes,
            seed=settings.seed,
        )
        status, violation, reason = _judge(m, ctx)
        return finish(status, "measured", violation, m.latency_s if m.latency_s is not None else predicted.latency_s * 10, reason, m)

    return objective


def _judge(m: Measurement, ctx: Context) -> tuple[str, float, str | None]:
    """(status, constraint value, reason) for a measurement against the budget."""
    if not m.ok:
        return m.status, 1.0, m.reason
    peak = measured_peak(m, ctx.target)
    if peak is not None and peak > ctx.budget_bytes:
        return "over-budget", float(peak - ctx.budget_bytes), f"measured peak {format_size(peak)} > budget {format_size(ctx.budget_bytes)}"
    return "ok", float((peak or 0) - ctx.budget_bytes), None


def measured_peak(m: Measurement, target: TargetHardware) -> int | None:
    """The peak the budget limits: max_memory_allocated on CUDA, the trial's peak RSS on CPU."""
    return m.peak_vram_bytes if target.device == "cuda" else m.peak_rss_bytes


def _measured_before(study, key: str, number: int):
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if trial.number != number and attrs.get("source") == "measured" and json.dumps(attrs.get("config"), sort_keys=True) == json.dumps(json.loads(key), sort_keys=True):
            return trial
    return None


def _record(trial) -> TrialRecord | None:
    attrs = trial.user_attrs
    if "status" not in attrs:
        return None  # running, or interrupted before it finished
    measurement = attrs.get("measurement")
    peak = None
    if measurement:
        peak = measurement.get("peak_vram_bytes") or measurement.get("peak_rss_bytes")
    feasible = attrs["status"] == "ok" and all(c <= 0 for c in trial.constraints.values())
    return TrialRecord(
        number=trial.number,
        summary=attrs["summary"],
        status=attrs["status"],
        source=attrs["source"],
        feasible=feasible and attrs["source"] != "estimate",
        latency_s=(measurement or {}).get("latency_s"),  # measured, whether or not it fits
        peak_bytes=peak,
        predicted_peak_bytes=attrs.get("predicted_peak_bytes"),
        reason=attrs.get("reason"),
        config=attrs["config"],
        measurement=measurement,
    )


# --- the study ----------------------------------------------------------------------------------


def run_study(
    model: str,
    profile: ModelProfile,
    workload: Workload,
    target: TargetHardware,
    *,
    budget_bytes: int | None = None,
    packages: dict[str, str | None] | None = None,
    storage: str | None = None,
    study: str | None = None,
    settings: TuneSettings | None = None,
    on_trial: Callable[[TuneResult], None] | None = None,
) -> TuneResult:
    """Run (or resume) the study until it holds ``settings.trials`` finished trials; return the results."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    settings = settings or TuneSettings()
    budget = default_budget(target) if budget_bytes is None else budget_bytes
    if budget <= 0:
        raise UsageError("--budget: must be larger than 0")
    if settings.trials < 1:
        raise UsageError(f"--trials: {settings.trials} must be at least 1")
    ctx = Context(profile, workload, target, packages, budget)
    space = search_space(ctx, compile_choices=settings.compile_choices)
    storage_url = storage or default_storage()
    name = study or study_name(profile, workload, target, budget)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    the_study = optuna.create_study(
        study_name=name,
        storage=open_storage(storage_url),
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=4),
        load_if_exists=True,
    )
    _seed_with_rules(the_study, space, ctx)

    def finished() -> int:
        return sum(1 for t in the_study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE)

    def seen() -> set[str]:
        # Finished trials only: a trial killed mid-run stays RUNNING in storage and answered nothing.
        done = the_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        return {json.dumps(t.params, sort_keys=True) for t in done if t.params}

    def exhausted() -> bool:
        # Every point of the space has an answer: more trials could only repeat them.
        return len(seen()) >= space.size()

    def callback(study_, trial) -> None:
        if on_trial is not None:
            on_trial(collect(the_study, name, shown_storage(storage_url), budget, space, ctx))
        if finished() >= settings.trials or exhausted():
            study_.stop()
        elif trial.user_attrs.get("source") == "repeat":
            # The sampler went back to a known point: queue the untried point predicted fastest instead.
            untried = [p for p in space.points() if json.dumps(p, sort_keys=True) not in seen()]
            if untried:
                study_.enqueue_trial(min(untried, key=lambda p: _predicted_latency(space, p, ctx)), user_attrs={"seeded_by": "untried"})

    remaining = settings.trials - finished()
    if remaining > 0 and not exhausted():
        the_study.optimize(
            _objective(space, ctx, model, settings), n_trials=remaining, callbacks=[callback], gc_after_trial=True
        )
    return collect(the_study, name, shown_storage(storage_url), budget, space, ctx)


def _predicted_latency(space: SearchSpace, params: dict[str, Any], ctx: Context) -> float:
    config, rejected = space.config(params, ctx)
    if rejected:
        return float("inf")
    result = estimate(ctx.profile, ctx.workload, config, ctx.target)
    return result.latency_s if peak_bytes(result, ctx.target) <= ctx.budget_bytes * PRUNE_MARGIN else float("inf")


def _seed_with_rules(study, space: SearchSpace, ctx: Context) -> None:
    """Enqueue the rule engine's pick and alternatives (once per study)."""
    if study.user_attrs.get("seeded"):
        return
    picks = recommend(ctx.profile, ctx.workload, ctx.target, packages=ctx.packages, budget_bytes=ctx.budget_bytes)
    candidates = ([picks.best] if picks.best else []) + picks.alternatives
    if not candidates and picks.smallest:
        candidates = [picks.smallest]
    for scored in candidates:
        params = space.params_of(scored.config)
        if params:
            study.enqueue_trial(params, user_attrs={"seeded_by": "rules"}, skip_if_exists=True)
    study.set_user_attr("seeded", True)


def collect(study, name: str, storage: str, budget: int, space: SearchSpace, ctx: Context) -> TuneResult:
    """The results so far: every finished trial, and the fastest measured one that fits."""
    records = [r for r in (_record(t) for t in study.get_trials(deepcopy=False)) if r is not None]
    feasible = [r for r in records if r.feasible and r.latency_s is not None]
    best = min(feasible, key=lambda r: (r.latency_s, r.peak_bytes or 0)) if feasible else None
    config = None
    advice: list[str] = []
    if best is not None:
        config = OptimizationConfig.model_validate(best.config).model_copy(
            update={
                "provenance": Provenance(
                    made_by="tune",
                    model=ctx.profile.model_id,
                    pipeline_class=ctx.profile.pipeline_class,
                    components=[c.name for c in ctx.profile.components],
                    workload=ctx.workload.to_dict(),
                    gpu_name=ctx.target.name if ctx.target.device == "cuda" else None,
                    vram_bytes=ctx.target.vram_total_bytes or None,
                    budget_bytes=budget,
                    packages={"advisor": __version__, **(ctx.packages or {})},
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    measured={
                        "latency_s": best.latency_s,
                        "peak_bytes": best.peak_bytes,
                        "trial": best.number,
                        "study": name,
                        **{k: (best.measurement or {}).get(k) for k in ("peak_vram_bytes", "peak_vram_reserved_bytes", "peak_rss_bytes", "per_step_s", "fixed_s", "warmup_s", "load_s")},
                    },
                )
            }
        )
    elif records:
        measured = [r for r in records if r.peak_bytes]
        if measured:
            smallest = min(measured, key=lambda r: r.peak_bytes)
            advice.append(f"the smallest measured peak was {format_size(smallest.peak_bytes)} ({smallest.summary}), over the {format_size(budget)} budget")
        failed = {r.status for r in records if r.status in {"oom", "crash", "timeout"}}
        if failed:
            advice.append(f"some trials ended as {', '.join(sorted(failed))}: see the reasons in the table")
        advice.append("try a larger --budget, a lower --height/--width/--frames, more --trials, or --no-prune")
    return TuneResult(name, storage, budget, records, best, config, space.size(), advice)


def run_workers(
    argv: list[str],
    workers: int,
    model: str,
    profile: ModelProfile,
    workload: Workload,
    target: TargetHardware,
    *,
    budget_bytes: int,
    packages: dict[str, str | None] | None,
    storage: str,
    study: str | None,
    settings: TuneSettings,
) -> TuneResult:
    """Run `workers` copies of this `advisor tune` command on one shared study and collect the result.

    With several GPUs each worker gets its own (CUDA_VISIBLE_DEVICES); on one GPU or a CPU they share it.
    """
    import subprocess
    import sys

    import optuna

    name = study or study_name(profile, workload, target, budget_bytes)
    # Create the study (and the database tables) once, before the workers race to do it.
    optuna.create_study(study_name=name, storage=open_storage(storage), direction="minimize", load_if_exists=True)
    base = [a for a in argv if a not in {"--json", "--quiet"}]
    base = _drop_option(_drop_option(_drop_option(_drop_option(base, "--workers"), "--study"), "--output"), "--report")
    base = _drop_option(base, "-o")
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
    processes = []
    for index in range(workers):
        env = dict(os.environ)
        if target.device == "cuda" and gpus is None and _gpu_count() > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(index % _gpu_count())
        processes.append(
            subprocess.Popen([sys.executable, "-m", "advisor", *base, "--study", name, "--quiet"], env=env)
        )
    codes = [p.wait() for p in processes]
    if all(code not in (0, 3) for code in codes):
        raise TuneError(f"--workers: every worker failed (exit codes {codes})")
    for index, code in enumerate(codes, start=1):
        if code not in (0, 3):
            print(f"advisor: warning: worker {index} of {workers} exited with code {code}", file=sys.stderr)
    ctx = Context(profile, workload, target, packages, budget_bytes)
    space = search_space(ctx, compile_choices=settings.compile_choices)
    the_study = optuna.load_study(study_name=name, storage=open_storage(storage))
    return collect(the_study, name, shown_storage(storage), budget_bytes, space, ctx)


def _drop_option(argv: list[str], option: str) -> list[str]:
    """`argv` without `option` and its value (``--x v`` or ``--x=v``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == option:
            skip = True
            continue
        if arg.startswith(option + "="):
            continue
        out.append(arg)
    return out


def _gpu_count() -> int:
    from advisor.probe.hardware import probe_gpus

    return len(probe_gpus()[0])
