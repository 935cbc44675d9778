"""The quality guard of `advisor tune`, for real: a lossless reference generated once per study, each
lossy output held to --min-psnr, the verdict shown in the table, --json and the report, and judged
again when a resumed study is given another floor."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from tuning import advisor, context, load_study

from advisor.config import OptimizationConfig
from advisor.plan.quality import is_lossy


# Everything but the floor as in tests/tuning.py (SMALL); 2 of the 3 configurations: the rule engine seeds the
# lossless one first, then a lossy one (int8 weight-only or fp8 storage).
ARGS = "--budget 2GB --trials 2 --no-compile --height 32 --width 32 --steps 4 --tolerance 0.5 --confirm 0".split()


def test_lossy_outputs_under_the_floor_are_infeasible_and_the_lossless_one_is_kept(tiny_flux_dir, tmp_path, env):
    storage = f"sqlite:///{tmp_path / 'guard.db'}"
    report = tmp_path / "report"
    # A floor no rounded output reaches: 8-bit weights change every image a little, so every lossy
    # candidate that changed its output must fail it, and the lossless one must pass.
    done = advisor(
        [
            "tune",
            "--model",
            str(tiny_flux_dir),
            *ARGS,
            "--storage",
            storage,
            "--min-psnr",
            "1000",
            "--json",
            "--report",
            str(report),
        ],
        env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    measured = [t for t in result["trials"] if t["source"] == "measured"]
    lossy = [t for t in measured if is_lossy(OptimizationConfig.from_dict(t["config"]))]
    lossless = [t for t in measured if t not in lossy]
    assert lossy and lossless
    for t in lossy:
        assert (
            t["quality"]["psnr_db"] is not None
            and 0 < t["quality"]["psnr_db"] < 1000
            and 0 < t["quality"]["ssim"] <= 1
        )
        assert t["status"] == "low-quality" and not t["feasible"]
        assert t["reason"].startswith(
            f"PSNR {t['quality']['psnr_db']:.1f} dB < --min-psnr 1000 dB against the lossless reference"
        )
    assert all(t["quality"] is None and t["status"] == "ok" for t in lossless)
    assert not is_lossy(OptimizationConfig.from_dict(result["best"]["config"]))
    # The reference is the lossless configuration (fp32, or bf16 on a CPU with bf16 instructions), measured as a trial too.
    assert any(
        f"compared with the lossless reference ({t['summary']})" in note for t in lossless for note in result["notes"]
    )
    images = Path(result["images"])
    assert (images / "reference.npy").exists() and (images / "reference.png").exists()
    assert all((images / f"trial-{t['number']}.png").exists() for t in lossy)
    assert not list(images.glob("trial-*.npy"))  # each compared output is dropped once judged
    summary = (report / "summary.md").read_text()
    assert "| quality |" in summary and "SSIM" in summary and (report / "quality.png").exists()
    assert load_study(storage).user_attrs["quality_reference"]["status"] == "ok"

    # The same study with a floor every output reaches: judged again, nothing measured again.
    again = advisor(
        ["tune", "--model", str(tiny_flux_dir), *ARGS, "--storage", storage, "--min-psnr", "1", "--json"], env
    )
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = json.loads(again.stdout)
    assert len(rerun["trials"]) == len(result["trials"])
    assert all(
        t["status"] == "ok" and t["feasible"] for t in rerun["trials"] if t["number"] in {x["number"] for x in lossy}
    )


def test_bad_floors_are_one_line_errors(tiny_flux_dir, tmp_path, env):
    for bad in ("-1", "nan", "inf"):
        done = advisor(
            [
                "tune",
                "--model",
                str(tiny_flux_dir),
                *ARGS,
                "--storage",
                f"sqlite:///{tmp_path / 'x.db'}",
                "--min-psnr",
                bad,
            ],
            env,
        )
        assert done.returncode == 2 and done.stderr.strip().startswith("advisor: error: --min-psnr:"), done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_workers_starting_together_generate_the_reference_once(tiny_flux_dir, tmp_path):
    """Two workers of one study on one machine (threads here, each with its own lock handle, as two
    processes would have) both find no reference; the first generates it in a real trial process,
    the second waits for it and uses that one."""
    import optuna

    from advisor.plan.space import SearchSpace
    from advisor.run.guard import QualityGuard
    from advisor.run.measure import measure

    scenario = context(tiny_flux_dir, 2 * 2**30)
    space = SearchSpace.for_scenario(scenario, compile_choices=(False,)).usable(scenario)
    study = optuna.create_study(storage=optuna.storages.InMemoryStorage())
    generated: list[str] = []

    def generate(config: OptimizationConfig, path: Path):
        generated.append(config.summary())
        return measure(
            str(tiny_flux_dir),
            config,
            scenario.workload,
            timeout_s=300,
            step_points=(1,),
            min_rounds=1,
            max_rounds=1,
            cap_s=0.0,
            output_path=path,
        )

    guard = QualityGuard(tmp_path / "quality", min_psnr_db=30.0)
    with ThreadPoolExecutor(2) as workers:
        list(workers.map(lambda _: guard.ensure_reference(study, space, scenario, generate), range(2)))
    assert len(generated) == 1, generated
    assert study.user_attrs["quality_reference"]["status"] == "ok" and guard.reference.exists()
