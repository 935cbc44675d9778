"""`advisor tune`: an optuna study that measures real candidates and keeps the fastest that fits.

The search space is the rule engine's: quantization choice x offload strategy x compile, restricted
to what is valid on the target. The rule engine's pick and alternatives are enqueued first; the
estimate skips candidates predicted far over budget (``prune=False`` measures them anyway); every
other trial runs in a fresh subprocess (`advisor.run.measure`). A trial's peak memory against the budget
is its constraint (``trial.set_constraint``): over budget, out of memory, crash and timeout are
infeasible trials with their reason, and the study goes on.

The study lives in optuna storage (SQLite by default, see `advisor.run.storage`), so running the same
command again resumes it, and several processes or machines can work one study through a journal
file or PostgreSQL. ``trials`` counts distinct configurations measured (repeats reuse an answer);
a later run measures again what crashed or timed out (out of memory too with ``retry_failed``);
Ctrl-C or SIGTERM raises `TuneInterrupted` carrying the finished trials.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from advisor.config import OptimizationConfig
from advisor.errors import UsageError
from advisor.plan.estimate import estimate_for
from advisor.plan.scenario import Scenario, on_one_gpu
from advisor.plan.space import SearchSpace
from advisor.run.claims import busy_keys, claim
from advisor.run.confirm import confirm_finalists
from advisor.run.guard import QualityGuard, quality_dir
from advisor.run.measure import Measurement, measure, remove_orphaned_scratch
from advisor.run.queue import enqueue_fastest_untried, enqueue_retries, point, seed_with_rules, skipped_by_estimate
from advisor.run.results import TuneResult, collect
from advisor.run.screening import Screening, screen
from advisor.run.stopping import Terminated, quiet_interrupts, terminate_as_interrupt
from advisor.run.storage import (
    default_storage,
    fail_orphaned_trials,
    open_storage,
    shown_storage,
    sole_tuner,
    this_runner,
)
from advisor.run.timing import (
    CONFIRM_RUNS,
    MAX_ROUNDS,
    MIN_PSNR_DB,
    MIN_ROUNDS,
    STEP_POINTS,
    TIMING_CAP_S,
    TOLERANCE,
    TRIAL_TIMEOUT_S,
    TRIALS,
    TrialTiming,
    cost_per_generation,
    one_off_s,
)
from advisor.run.trials import (
    Source,
    Status,
    TrialRecord,
    Verdict,
    config_key,
    config_of,
    judge,
    measured_again,
    measurement_of,
    reason_of,
    set_runner,
    source_of,
    status_of,
    stored_config,
    write_result,
)
from advisor.units import format_size


def study_name(scenario: Scenario, timeout_s: float = TRIAL_TIMEOUT_S) -> str:
    """Same model, workload, machine, budget and trial timeout -> same study, so re-running resumes it.

    The timeout is part of the name: a study whose trials timed out under a too-short
    ``--trial-timeout`` is not the one a corrected command resumes."""
    profile, workload, target, budget = scenario.profile, scenario.workload, scenario.target, scenario.budget_bytes
    key = json.dumps(
        [profile.model_id, workload.to_dict(), target.name, target.device, budget, float(timeout_s)], sort_keys=True
    )
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(profile.model_id).name).strip("-").lower()
    timeout = f"{timeout_s:g}".replace(".", "p")
    return f"{slug}-{workload.kind}-{format_size(budget).replace(' ', '')}-t{timeout}s-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def check_settings(settings: TuneSettings) -> None:
    """A UsageError naming the flag for a setting no study can run with."""
    if isinstance(settings.trials, bool) or not isinstance(settings.trials, int) or settings.trials < 1:
        raise UsageError(f"--trials: {settings.trials} is not valid; give a whole number of at least 1")
    timeout = settings.timeout_s
    if not _positive_number(timeout):
        raise UsageError(f"--trial-timeout: {timeout:g} is not valid; give a finite number of seconds greater than 0")
    if not _positive_number(settings.tolerance) or settings.tolerance >= 1:
        raise UsageError(
            f"--tolerance: {settings.tolerance:g} is not valid; give a fraction of the latency between 0 and 1, e.g. 0.05"
        )
    runs = settings.confirm_runs
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < 0:
        raise UsageError(
            f"--confirm: {runs} is not valid; give a whole number of runs, 0 or more (0: no confirmation)"
        )
    floor = settings.min_psnr_db
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not math.isfinite(floor) or floor < 0:
        raise UsageError(
            f"--min-psnr: {floor:g} is not valid; give a finite PSNR in dB, 0 or more (0: no quality check), e.g. 30"
        )


def _positive_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# --- trials -------------------------------------------------------------------------------------


class TuneInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a study: the trial running was dropped (marked failed, its process
    killed); `result` holds the finished ones; `exit_code` is 128 + the signal (130 or 143)."""

    def __init__(self, result: TuneResult, exit_code: int = 130):
        super().__init__("interrupted")
        self.result, self.exit_code = result, exit_code


@dataclass
class TuneSettings:
    trials: int = TRIALS  # distinct configurations measured (repeats and estimates don't count)
    timeout_s: float = TRIAL_TIMEOUT_S  # per trial
    prune: bool = True
    step_points: tuple[int, ...] = STEP_POINTS
    repeats: int = MIN_ROUNDS  # timed rounds at least; more until the spread is within `tolerance`
    tolerance: float = TOLERANCE  # the latency's spread (half range / median) a trial settles at
    max_rounds: int = MAX_ROUNDS
    timing_cap_s: float = TIMING_CAP_S  # per trial, after loading and warm-up
    memory_limit_bytes: int | None = None  # RLIMIT_AS for each trial process (tests provoke OOM)
    seed: int = 0
    compile_choices: tuple[bool, ...] = (True, False)
    retry_failed: bool = False  # re-measure earlier runs' out-of-memory trials too (crash and timeout always are)
    rehearse: bool = True  # rehearse a GPU config on a virtual GPU before its trial (`advisor.run.screening`)
    confirm_runs: int = CONFIRM_RUNS  # more fresh processes per finalist after the search (`advisor.run.confirm`)
    # a lossy output's floor against the lossless reference (`advisor.run.guard`); 0: no guard
    min_psnr_db: float = MIN_PSNR_DB

    def timing(self) -> TrialTiming:
        """How each trial process times its candidate."""
        return TrialTiming(
            timeout_s=self.timeout_s,
            step_points=self.step_points,
            min_rounds=self.repeats,
            max_rounds=self.max_rounds,
            tolerance=self.tolerance,
            cap_s=self.timing_cap_s,
            memory_limit_bytes=self.memory_limit_bytes,
            seed=self.seed,
        )


def stale_trials(study, settings: TuneSettings) -> set[int]:
    """The trials, at the start of a run, whose answer that run does not trust: failed ones it retries
    (`advisor.run.trials.measured_again`), estimates when the run measures everything (``prune=False``),
    and rehearsals' refusals when it rehearses nothing (``rehearse=False``)."""
    stale = set()
    for t in study.get_trials(deepcopy=False):
        status = status_of(t)
        if (
            measured_again(status, settings.retry_failed)
            or (not settings.prune and status == Status.SKIPPED)
            or (not settings.rehearse and source_of(t) == Source.REHEARSAL)
        ):
            stale.add(t.number)
    return stale


@dataclass
class Progress:
    """What the study's trials answer, leaving out the stale ones."""

    points: set[str]  # points of the space with an answer (measured, decided by the estimate, or a repeat)
    measured: set[str]  # configurations measured (what --trials counts)

    @classmethod
    def of(cls, study, stale: set[int] = frozenset()) -> Progress:
        import optuna

        points, measured = set(), set()
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if t.number in stale or status_of(t) is None or not t.params:
                continue
            points.add(point(t.params))
            if source_of(t) == Source.MEASURED:
                measured.add(config_key(config_of(t)))
        return cls(points, measured)


def exhausted_note(space: SearchSpace, progress: Progress, wanted: int) -> str | None:
    """The line saying the space ran out before `wanted` distinct configurations were measured."""
    if len(progress.measured) >= wanted or not all(point(p) in progress.points for p in space.points()):
        return None
    if len(progress.measured) >= space.size():
        return f"the search space has only {space.size()} configurations; all measured"
    return (
        f"the search space has only {space.size()} configurations; all measured or ruled out by the estimate, "
        "a rule or a rehearsal "
        f"({len(progress.measured)} measured)"
    )


def _objective(
    space: SearchSpace,
    scenario: Scenario,
    model: str,
    settings: TuneSettings,
    stale: set[int],
    guard: QualityGuard,
    on_phase: Callable[[int, str, str], None] | None = None,
) -> Callable:
    import optuna

    device, budget = scenario.target.device, scenario.budget_bytes

    def objective(trial) -> float:
        set_runner(trial, this_runner())
        params = {
            "quantization": trial.suggest_categorical("quantization", list(space.quantization)),
            "offload": trial.suggest_categorical("offload", list(space.offload)),
            "compile": trial.suggest_categorical("compile", space.compile),
        }
        for name, values in space.optional_dimensions().items():
            params[name] = trial.suggest_categorical(name, values)
        candidate = space.candidate(params, scenario)
        config = candidate.config
        predicted = estimate_for(scenario, config)
        predicted_peak = predicted.limited_peak(device)
        stored = config.to_dict(exclude_none=False)  # as studies have always stored it

        def finish(
            status: Status,
            source: Source,
            violation: float,
            latency: float,
            reason: str | None,
            m: Measurement | None = None,
        ) -> float:
            write_result(
                trial,
                violation,
                summary=config.summary(),
                status=status,
                source=source,
                predicted_peak_bytes=predicted_peak,
                reason=reason,
                config=stored,
                measurement=m.to_dict() if m is not None else None,
                predicted_latency_s=predicted.latency_s,
            )
            return latency

        def finish_measured(source: Source, m: Measurement, note: str | None = None) -> float:
            verdict = _judge(m, scenario, guard)
            reason = "; ".join(part for part in (note, verdict.reason) if part) or None
            # What the pick ranks by (`TrialRecord.cost_s`).
            cost = (
                cost_per_generation(m.latency_s, one_off_s(m.to_dict()), scenario.generations)
                if m.latency_s
                else predicted.latency_s * 10
            )
            return finish(verdict.status, source, verdict.violation, cost, reason, m)

        if candidate.rejected_by:
            return finish(
                Status.INVALID, Source.ESTIMATE, 1.0, predicted.latency_s, f"rejected by rule {candidate.rejected_by}"
            )
        if not claim(trial, config_key(stored)):  # another worker is measuring it: the tuner moves on
            raise optuna.TrialPruned(f"another worker is measuring {config.summary()}")
        earlier = _answered_before(
            trial.study, stored, trial.number, stale
        )  # after the claim: no answer slips between
        if earlier is not None:  # the sampler proposed a configuration already answered: reuse the answer
            same = f"same as trial {earlier.number}"
            if source_of(earlier) in (Source.ESTIMATE, Source.REHEARSAL):  # answered without a measurement
                violation = earlier.constraints.get("peak_over_budget", 1.0)
                return finish(
                    status_of(earlier), Source.REPEAT, violation, predicted.latency_s, f"{same}; {reason_of(earlier)}"
                )
            return finish_measured(Source.REPEAT, Measurement(**measurement_of(earlier)), same)
        if skipped_by_estimate(predicted_peak, scenario, settings.prune):
            reason = f"predicted peak {format_size(predicted_peak)} is far over the {format_size(budget)} budget"
            return finish(Status.SKIPPED, Source.ESTIMATE, float(predicted_peak - budget), predicted.latency_s, reason)
        screening = Screening()
        if settings.rehearse:
            if on_phase:
                on_phase(trial.number, config.summary(), "rehearsing on a virtual GPU")
            screening = screen(scenario, config)
        if screening.refusal:
            return finish(Status.INVALID, Source.REHEARSAL, 1.0, predicted.latency_s, screening.refusal)
        output = guard.output_path(trial.number) if guard.checks(config) else None
        m = _measure(
            model,
            config,
            scenario,
            settings,
            (lambda phase: on_phase(trial.number, config.summary(), phase)) if on_phase else None,
            output,
        )
        if output is not None:
            m.quality = guard.compare(trial.number)
        return finish_measured(Source.MEASURED, m, screening.note)

    return objective


def _measure(
    model: str,
    config: OptimizationConfig,
    scenario: Scenario,
    settings: TuneSettings,
    on_phase: Callable[[str], None] | None,
    output_path: Path | None = None,
) -> Measurement:
    """One measurement of `config` in a fresh process, as the settings say to time it (saving its
    output at `output_path` for the quality guard)."""
    return measure(model, config, scenario.workload, settings.timing(), on_phase=on_phase, output_path=output_path)


def confirm_study(
    study,
    model: str,
    scenario: Scenario,
    settings: TuneSettings,
    result: Callable[[], TuneResult],
    on_trial: Callable[[TuneResult], None] | None = None,
    on_phase: Callable[[int, str, str], None] | None = None,
) -> None:
    """The finalists measured ``settings.confirm_runs`` more times each (`advisor.run.confirm`)."""

    def measure_again(record: TrialRecord, shown: Callable[[str], None] | None) -> Measurement:
        return _measure(model, stored_config(record.config), scenario, settings, shown)

    confirm_finalists(study, settings.confirm_runs, result, measure_again, on_trial, on_phase)


def _judge(m: Measurement, scenario: Scenario, guard: QualityGuard) -> Verdict:
    """How a measurement ends against the budget and the quality floor (`advisor.run.trials.judge`)."""
    too_far = guard.verdict(m.quality) if m.ok else None
    return judge(m.status, m.reason, m.limited_peak(scenario.target.device), scenario.budget_bytes, too_far)


def _answered_before(study, config: dict[str, Any], number: int, stale: set[int]):
    """A finished trial, not stale, that measured `config` (or else decided it without a measurement:
    by the estimate, or by its rehearsal)."""
    wanted, unmeasured = config_key(config), None
    for trial in study.get_trials(deepcopy=False):
        if trial.number == number or trial.number in stale or config_key(config_of(trial)) != wanted:
            continue
        if source_of(trial) == Source.MEASURED and measurement_of(trial):
            return trial
        if source_of(trial) in (Source.ESTIMATE, Source.REHEARSAL) and unmeasured is None:
            unmeasured = trial
    return unmeasured


# --- the study ----------------------------------------------------------------------------------


def run_study(
    model: str,
    scenario: Scenario,
    *,
    storage: str | None = None,
    study: str | None = None,
    settings: TuneSettings | None = None,
    on_trial: Callable[[TuneResult], None] | None = None,
    on_phase: Callable[[int, str, str], None] | None = None,
) -> TuneResult:
    """Run (or resume) the study until ``settings.trials`` distinct configurations are measured or
    every point of the space has an answer; return the results. `on_trial` gets the results after
    each trial; `on_phase` gets (trial number, configuration, phase) as a measurement goes on.

    Crashed and timed-out trials of earlier runs are measured again (out-of-memory ones too with
    ``retry_failed``). Ctrl-C raises `TuneInterrupted` with the finished trials."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    settings = settings or TuneSettings()
    check_settings(settings)
    scenario, one_gpu = on_one_gpu(scenario)
    space = SearchSpace.for_scenario(scenario, compile_choices=settings.compile_choices).usable(scenario)
    storage_url = storage or default_storage()
    name = study or study_name(scenario, settings.timeout_s)
    optuna.logging.set_verbosity(
        optuna.logging.ERROR
    )  # its "trial failed" warnings repeat the table, traceback and all
    quiet_interrupts()
    remove_orphaned_scratch()  # what tuners killed with -9 left in the temp folder
    with sole_tuner(storage_url, name), terminate_as_interrupt():
        backend = open_storage(storage_url)
        the_study = optuna.create_study(
            study_name=name,
            storage=backend,
            direction="minimize",
            sampler=optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=4),
            load_if_exists=True,
        )
        fail_orphaned_trials(backend, name)
        seed_with_rules(the_study, space, scenario, settings.trials)
        stale = stale_trials(the_study, settings)
        enqueue_retries(the_study, stale, Progress.of(the_study, stale).points)
        guard = QualityGuard(quality_dir(storage_url, name), settings.min_psnr_db)

        def result() -> TuneResult:
            done = collect(the_study, name, shown_storage(storage_url), space, scenario, guard)
            judged = done.best is not None or any(r.quality for r in done.trials)
            notes = [
                one_gpu,
                exhausted_note(space, Progress.of(the_study, stale), settings.trials),
                guard.note(the_study, judged=judged),
            ]
            done.notes = done.notes + [note for note in notes if note]
            done.images, done.reference = (
                (str(guard.folder), guard.reference_summary(the_study)) if guard.reference.exists() else (None, None)
            )
            return done

        reference = replace(
            settings, repeats=1, max_rounds=1, timing_cap_s=0.0
        )  # one timed round: the output is what counts

        def measure_reference(config: OptimizationConfig, path: Path) -> Measurement:
            return _measure(
                model,
                config,
                scenario,
                reference,
                on_phase and (lambda phase: on_phase(-1, config.summary(), phase)),
                path,
            )

        def finished(progress: Progress) -> bool:
            return len(progress.measured) >= settings.trials or all(
                point(p) in progress.points for p in space.points()
            )

        objective = _objective(space, scenario, model, settings, stale, guard, on_phase)
        # Each trial answers a new point, or repeats one or leaves it to another worker (then the
        # untried point predicted fastest is queued): this bound is never reached unless other
        # workers keep taking the queued points.
        try:
            if settings.min_psnr_db > 0:
                guard.ensure_reference(
                    the_study,
                    space,
                    scenario,
                    measure_reference,
                    settings.retry_failed,
                    measured=lambda config: (
                        not skipped_by_estimate(
                            estimate_for(scenario, config).limited_peak(scenario.target.device),
                            scenario,
                            settings.prune,
                        )
                    ),
                )
            for _ in range(2 * (space.size() + settings.trials) + 2):
                if finished(Progress.of(the_study, stale)):
                    break
                ran: list = []
                the_study.optimize(
                    objective, n_trials=1, gc_after_trial=True, callbacks=[lambda _, trial: ran.append(trial)]
                )
                if on_trial is not None:
                    on_trial(result())
                progress = Progress.of(the_study, stale)
                moved_on = ran and (
                    source_of(ran[-1]) == Source.REPEAT or ran[-1].state == optuna.trial.TrialState.PRUNED
                )
                if moved_on and not finished(progress):
                    enqueue_fastest_untried(
                        the_study, space, scenario, progress.points, busy_keys(the_study, ran[-1].number)
                    )
            confirm_study(the_study, model, scenario, settings, result, on_trial, on_phase)
        except KeyboardInterrupt as stop:  # optuna has marked the running trial failed; the finished ones stand
            raise TuneInterrupted(result(), 143 if isinstance(stop, Terminated) else 130) from None
        return result()
