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
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from advisor.config import OptimizationConfig
from advisor.errors import TuneError, UsageError
from advisor.paths import advisor_cache_dir
from advisor.plan.estimate import estimate
from advisor.plan.recommend import recommend
from advisor.plan.scenario import Scenario
from advisor.plan.space import SearchSpace
from advisor.run.measure import Measurement, measure
from advisor.run.trials import TrialRecord
from advisor.units import format_size

# Candidates predicted beyond budget x this are skipped without measuring (unless prune=False).
PRUNE_MARGIN = 1.25
# What `provenance.measured` of a tuned config carries from the best trial's measurement.
MEASURED_IN_PROVENANCE = ("peak_vram_bytes", "peak_vram_reserved_bytes", "peak_rss_bytes", "per_step_s", "fixed_s", "warmup_s", "load_s")


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


def study_name(scenario: Scenario) -> str:
    """Same model, workload, machine and budget -> same study, so re-running resumes it."""
    profile, workload, target, budget = scenario.profile, scenario.workload, scenario.target, scenario.budget_bytes
    key = json.dumps([profile.model_id, workload.to_dict(), target.name, target.device, budget], sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(profile.model_id).name).strip("-").lower()
    return f"{slug}-{workload.kind}-{format_size(budget).replace(' ', '')}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


# --- trials -------------------------------------------------------------------------------------


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


def _objective(space: SearchSpace, scenario: Scenario, model: str, settings: TuneSettings) -> Callable:
    device, budget = scenario.target.device, scenario.budget_bytes

    def objective(trial) -> float:
        params = {
            "quantization": trial.suggest_categorical("quantization", list(space.quantization)),
            "offload": trial.suggest_categorical("offload", list(space.offload)),
            "compile": trial.suggest_categorical("compile", space.compile),
        }
        candidate = space.candidate(params, scenario)
        config = candidate.config
        predicted = estimate(scenario.profile, scenario.workload, config, scenario.target)
        predicted_peak = predicted.limited_peak(device)
        key = config.model_dump_json()

        def finish(status: str, source: str, violation: float, latency: float, reason: str | None, m: Measurement | None = None) -> float:
            attrs = TrialRecord.attrs(
                summary=config.summary(), status=status, source=source, predicted_peak_bytes=predicted_peak,
                reason=reason, config=json.loads(key), measurement=m.to_dict() if m is not None else None,
                predicted_latency_s=predicted.latency_s,
            )
            for name, value in attrs.items():
                trial.set_user_attr(name, value)
            trial.set_constraint("peak_over_budget", violation)
            return latency

        if candidate.rejected_by:
            return finish("invalid", "estimate", 1.0, predicted.latency_s, f"rejected by rule {candidate.rejected_by}")
        if settings.prune and predicted_peak > budget * PRUNE_MARGIN:
            reason = f"predicted peak {format_size(predicted_peak)} is far over the {format_size(budget)} budget"
            return finish("skipped", "estimate", float(predicted_peak - budget), predicted.latency_s, reason)
        earlier = _measured_before(trial.study, key, trial.number)
        if earlier is not None:  # the sampler proposed a configuration already measured: reuse it
            m = Measurement(**earlier.user_attrs["measurement"])
            status, violation, reason = _judge(m, scenario)
            return finish(status, "repeat", violation, m.latency_s or predicted.latency_s, f"same as trial {earlier.number}" + (f"; {reason}" if reason else ""), m)
        m = measure(
            model,
            config,
            scenario.workload,
            timeout_s=settings.timeout_s,
            step_points=settings.step_points,
            repeats=settings.repeats,
            memory_limit_bytes=settings.memory_limit_bytes,
            seed=settings.seed,
        )
        status, violation, reason = _judge(m, scenario)
        return finish(status, "measured", violation, m.latency_s if m.latency_s is not None else predicted.latency_s * 10, reason, m)

    return objective


def _judge(m: Measurement, scenario: Scenario) -> tuple[str, float, str | None]:
    """(status, constraint value, reason) for a measurement against the budget."""
    if not m.ok:
        return m.status, 1.0, m.reason
    peak, budget = m.limited_peak(scenario.target.device), scenario.budget_bytes
    if peak is not None and peak > budget:
        return "over-budget", float(peak - budget), f"measured peak {format_size(peak)} > budget {format_size(budget)}"
    return "ok", float((peak or 0) - budget), None


def _measured_before(study, key: str, number: int):
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        if trial.number != number and attrs.get("source") == "measured" and json.dumps(attrs.get("config"), sort_keys=True) == json.dumps(json.loads(key), sort_keys=True):
            return trial
    return None


# --- the study ----------------------------------------------------------------------------------


def run_study(
    model: str,
    scenario: Scenario,
    *,
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
    if settings.trials < 1:
        raise UsageError(f"--trials: {settings.trials} must be at least 1")
    space = SearchSpace.for_scenario(scenario, compile_choices=settings.compile_choices).usable(scenario)
    storage_url = storage or default_storage()
    name = study or study_name(scenario)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    the_study = optuna.create_study(
        study_name=name,
        storage=open_storage(storage_url),
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=4),
        load_if_exists=True,
    )
    _seed_with_rules(the_study, space, scenario)

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
            on_trial(collect(the_study, name, shown_storage(storage_url), space, scenario))
        if finished() >= settings.trials or exhausted():
            study_.stop()
        elif trial.user_attrs.get("source") == "repeat":
            # The sampler went back to a known point: queue the untried point predicted fastest instead.
            untried = [p for p in space.points() if json.dumps(p, sort_keys=True) not in seen()]
            if untried:
                fastest = min(untried, key=lambda p: _predicted_latency(space, p, scenario))
                study_.enqueue_trial(fastest, user_attrs={"seeded_by": "untried"})

    remaining = settings.trials - finished()
    if remaining > 0 and not exhausted():
        the_study.optimize(
            _objective(space, scenario, model, settings), n_trials=remaining, callbacks=[callback], gc_after_trial=True
        )
    return collect(the_study, name, shown_storage(storage_url), space, scenario)


def _predicted_latency(space: SearchSpace, params: dict[str, Any], scenario: Scenario) -> float:
    candidate = space.candidate(params, scenario)
    if candidate.rejected_by:
        return float("inf")
    result = estimate(scenario.profile, scenario.workload, candidate.config, scenario.target)
    fits = result.limited_peak(scenario.target.device) <= scenario.budget_bytes * PRUNE_MARGIN
    return result.latency_s if fits else float("inf")


def _seed_with_rules(study, space: SearchSpace, scenario: Scenario) -> None:
    """Enqueue the rule engine's pick and alternatives (once per study)."""
    if study.user_attrs.get("seeded"):
        return
    picks = recommend(scenario)
    candidates = ([picks.best] if picks.best else []) + picks.alternatives
    if not candidates and picks.smallest:
        candidates = [picks.smallest]
    for scored in candidates:
        params = space.params_of(scored.config)
        if params:
            study.enqueue_trial(params, user_attrs={"seeded_by": "rules"}, skip_if_exists=True)
    study.set_user_attr("seeded", True)


def collect(study, name: str, storage: str, space: SearchSpace, scenario: Scenario) -> TuneResult:
    """The results so far: every finished trial, and the fastest measured one that fits."""
    device, budget = scenario.target.device, scenario.budget_bytes
    records = [r for r in (TrialRecord.from_trial(t, device) for t in study.get_trials(deepcopy=False)) if r is not None]
    feasible = [r for r in records if r.feasible and r.latency_s is not None]
    best = min(feasible, key=lambda r: (r.latency_s, r.peak_bytes or 0)) if feasible else None
    config = None
    advice: list[str] = []
    if best is not None:
        measured = {"latency_s": best.latency_s, "peak_bytes": best.peak_bytes, "trial": best.number, "study": name}
        measured.update({key: (best.measurement or {}).get(key) for key in MEASURED_IN_PROVENANCE})
        config = OptimizationConfig.model_validate(best.config).model_copy(
            update={"provenance": scenario.provenance("tune", measured=measured)}
        )
    elif records:
        measured_peaks = [r for r in records if r.peak_bytes]
        if measured_peaks:
            smallest = min(measured_peaks, key=lambda r: r.peak_bytes)
            advice.append(f"the smallest measured peak was {format_size(smallest.peak_bytes)} ({smallest.summary}), over the {format_size(budget)} budget")
        failed = {r.status for r in records if r.status in {"oom", "crash", "timeout"}}
        if failed:
            advice.append(f"some trials ended as {', '.join(sorted(failed))}: see the reasons in the table")
        advice.append("try a larger --budget, a lower --height/--width/--frames, more --trials, or --no-prune")
    return TuneResult(name, storage, budget, records, best, config, space.size(), advice)
