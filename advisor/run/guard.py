"""The quality guard of a study: a lossless reference generated once, every lossy output held to it.

Before its first trial, a study generates the reference: the lossless candidate predicted fastest
within the budget (else the one predicted smallest), in a trial process like any other, at the
workload's steps with the study's seed and prompt (`advisor.run.measure`, ``output_path``). Each
lossy candidate's trial then saves its own output the same way, and `judge` compares the two
(`advisor.run.quality`: PSNR, SSIM, the worst frame of a video): under ``--min-psnr`` the candidate
is infeasible with the measured value as its reason. Lossless candidates (offload, compile,
attention kernels other than SageAttention) are not checked: they compute the same numbers.

The outputs live in ``~/.cache/advisor/quality/<study>/``: ``reference.npy`` (kept, so that a
resumed study compares against the same image), and a PNG of the reference and of each lossy
trial's first image or frame, for the report. The study's ``quality_reference`` user attribute
says which configuration made it, or why there is none.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from advisor.config import OptimizationConfig
from advisor.paths import advisor_cache_dir
from advisor.plan.estimate import estimate_for
from advisor.plan.quality import is_lossy
from advisor.run.trials import Reference, Status, TrialRecord, judge, measured_again, reference_of, store_reference


if TYPE_CHECKING:
    from advisor.plan.scenario import Scenario
    from advisor.plan.space import SearchSpace
    from advisor.run.measure import Measurement


@contextlib.contextmanager
def _held(lock: Path) -> Iterator[None]:
    """An exclusive ``flock`` on `lock` while inside, waiting for it; the kernel frees it when the holder dies."""
    import fcntl

    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def quality_dir(storage: str, study: str) -> Path:
    return advisor_cache_dir() / "quality" / hashlib.sha1(f"{storage}\n{study}".encode()).hexdigest()[:16]


def reference_config(
    space: SearchSpace, scenario: Scenario, measured: Callable[[OptimizationConfig], bool] = lambda _config: True
) -> OptimizationConfig | None:
    """The lossless candidate predicted fastest within the budget, else the one predicted smallest;
    None when the space has nothing lossless, or no lossy candidate the study will have `measured`
    (the estimate skips those predicted far over the budget) to hold to it."""
    lossless, lossy = [], False
    for point in space.points():
        candidate = space.candidate(point, scenario)
        if candidate.rejected_by is None:
            if is_lossy(candidate.config):
                lossy = lossy or measured(candidate.config)
            else:
                lossless.append((estimate_for(scenario, candidate.config), candidate.config))
    if not lossless or not lossy:
        return None
    device, budget = scenario.target.device, scenario.budget_bytes
    fitting = [(e.latency_s, c.key, c) for e, c in lossless if e.limited_peak(device) <= budget]
    if fitting:
        return min(fitting)[2]
    return min((e.limited_peak(device), c.key, c) for e, c in lossless)[2]


class QualityGuard:
    """The reference of one study and the floor lossy outputs are held to."""

    def __init__(self, folder: Path, min_psnr_db: float):
        self.folder, self.min_psnr_db = folder, min_psnr_db
        self.reference = folder / "reference.npy"

    def ensure_reference(
        self,
        study,
        space: SearchSpace,
        scenario: Scenario,
        measure: Callable[[OptimizationConfig, Path], Measurement],
        retry_failed: bool = False,
        measured: Callable[[OptimizationConfig], bool] = lambda _config: True,
    ) -> None:
        """Generate the reference unless the study has it, or failed to make it in a way that a new
        run does not retry (`note` says why): a crashed or timed-out reference is made again, one
        that ran out of memory with `retry_failed`, as trials are (`advisor.run.trials.measured_again`).
        Nothing is generated when no lossy candidate will be `measured`.

        Workers of one study on one machine share the folder: the first to take its lock generates
        the reference, the others wait for it and find it made (a worker on another machine makes
        its own copy, the same configuration's output)."""
        if self._settled(study, retry_failed):
            return
        config = reference_config(space, scenario, measured)
        if config is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        with _held(self.folder / "reference.lock"):
            if self._settled(study, retry_failed):
                return
            self._generate(study, config, measure)

    def _settled(self, study, retry_failed: bool) -> bool:
        """Whether the study has its reference, or an answer about it that this run keeps."""
        stored = reference_of(study)
        if stored is None:
            return False
        if stored.status == Status.OK:
            return self.reference.exists()
        return not measured_again(stored.status, retry_failed)

    def _generate(
        self, study, config: OptimizationConfig, measure: Callable[[OptimizationConfig, Path], Measurement]
    ) -> None:
        m = measure(config, self.reference)
        if m.ok and self.reference.exists():
            self._save_png(self.reference, self.folder / "reference.png")
            store_reference(study, Reference(Status.OK, config.summary(), config=config.to_dict()))
            return
        note = f"no lossless reference output ({config.summary()}: {m.status}, {m.reason}): lossy candidates' quality is not checked"
        store_reference(study, Reference(Status(m.status), config.summary(), note=note))

    def note(self, study, *, judged: bool = True) -> str | None:
        """What the study's notes say about the guard: why there is no reference; else, where any
        output was `judged` (something fits, or was compared), how lossy outputs are held to it."""
        stored = reference_of(study)
        if stored is None:
            return None
        if stored.status != Status.OK:
            return stored.note
        if not judged:
            return None
        if self.min_psnr_db <= 0:
            return "the quality check is off (--min-psnr 0): the outputs compared earlier keep their PSNR, none is held to a floor"
        return (
            f"lossy outputs are compared with the lossless reference ({stored.summary}), same seed, prompt and steps: "
            f"under --min-psnr {self.min_psnr_db:g} dB a candidate is infeasible (images in {self.folder})"
        )

    def reference_summary(self, study) -> str | None:
        stored = reference_of(study)
        return stored.summary if stored is not None else None

    def checks(self, config: OptimizationConfig) -> bool:
        """Whether a trial of `config` saves its output for the comparison."""
        return self.min_psnr_db > 0 and is_lossy(config) and self.reference.exists()

    def output_path(self, number: int) -> Path:
        return self.folder / f"trial-{number}.npy"

    def compare(self, number: int) -> dict[str, Any] | None:
        """The trial's saved output against the reference (the array is dropped, a PNG kept)."""
        import numpy as np

        from advisor.run.quality import compare

        path = self.output_path(number)
        if not path.exists():
            return None
        try:
            return compare(np.load(path), np.load(self.reference))
        finally:
            self._save_png(path, self.folder / f"trial-{number}.png")
            path.unlink(missing_ok=True)

    def verdict(self, quality: dict[str, Any] | None) -> str | None:
        """Why a measured quality is under the floor, or None (identical outputs have no PSNR)."""
        value = (quality or {}).get("psnr_db")
        if value is None or value >= self.min_psnr_db:
            return None
        return (
            f"PSNR {value:.1f} dB < --min-psnr {self.min_psnr_db:g} dB against the lossless reference "
            f"(SSIM {quality.get('ssim'):.3f})"
        )

    def judged(self, record: TrialRecord, budget: int) -> TrialRecord:
        """`record` with its status under this floor: a measured ok trial whose quality is under it
        becomes low-quality, and a low-quality one over it (a lower floor this run) ok again (it
        was judged only once within the budget)."""
        if record.quality is None or record.status not in (Status.OK, Status.LOW_QUALITY):
            return record
        verdict = judge(Status.OK, None, record.peak_bytes, budget, self.verdict(record.quality))
        if verdict.status == record.status:
            return record
        fits = verdict.status == Status.OK and record.peak_bytes is not None
        return replace(record, status=verdict.status, feasible=fits, reason=verdict.reason)

    @staticmethod
    def _save_png(array_path: Path, png: Path) -> None:
        import numpy as np
        from PIL import Image

        frames = np.load(array_path)
        first = frames.reshape(-1, *frames.shape[-3:])[0]
        Image.fromarray((np.clip(first, 0, 1) * 255).round().astype("uint8")).save(png)
