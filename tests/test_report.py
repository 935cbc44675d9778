"""The tuning report: Pareto front, plot and Markdown summary from trial records."""

from advisor.run.report import markdown, pareto_front, write_report
from advisor.run.results import TuneResult
from advisor.run.trials import TrialRecord


MB = 2**20


def trial(number, latency, peak, status="ok", source="measured"):
    return TrialRecord(number, f"config {number}", status, source, status == "ok", latency, peak, peak, None, {})


def result(trials, best=None):
    return TuneResult("study", "sqlite:///x.db", 700 * MB, trials, best, None, len(trials))


def test_pareto_front_keeps_only_undominated_measured_trials():
    trials = [
        trial(0, 3.0, 500 * MB),
        trial(1, 2.0, 600 * MB),
        trial(2, 2.5, 650 * MB),
        trial(3, 1.0, 900 * MB, "over-budget"),
        trial(4, None, None, "oom"),
        trial(5, 0.5, 400 * MB, "skipped", "estimate"),
    ]
    trials[5].latency_s = None  # skipped trials have no measured latency
    assert [t.number for t in pareto_front(trials)] == [0, 1, 3]


def test_report_writes_a_plot_and_a_summary(tmp_path):
    trials = [trial(0, 3.0, 500 * MB), trial(1, 2.0, 600 * MB), trial(2, 1.0, 900 * MB, "over-budget")]
    summary = write_report(result(trials, best=trials[1]), tmp_path / "report")
    image = summary.with_name("tune.png")
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 10_000
    text = summary.read_text()
    assert "**Chosen**: config 1" in text and "![latency against peak memory](tune.png)" in text
    assert text.count("\n| ") == 1 + len(trials)  # header row + one row per trial


def test_summary_without_a_feasible_trial_gives_the_advice():
    empty = result([trial(0, 1.0, 900 * MB, "over-budget")])
    empty.advice = ["try a larger --budget"]
    assert "**Nothing feasible.**" in markdown(empty) and "- try a larger --budget" in markdown(empty)


def test_summary_says_why_the_study_stopped_and_whether_it_was_interrupted():
    done = result([trial(0, 1.0, 500 * MB)], best=None)
    assert "Interrupted" not in markdown(done) and "Note:" not in markdown(done)
    done.notes = ["the search space has only 1 configurations; all measured"]
    done.interrupted = True
    text = markdown(done)
    assert "Note: the search space has only 1 configurations; all measured." in text
    assert "*Interrupted: the trials finished so far; running the same command resumes the study.*" in text
    assert text.count("\n| ") == 2  # the table is unchanged: header row + one trial


def spread_trial(number, latency, spread, peak, predicted_peak, predicted_latency, status="ok", source="measured"):
    record = trial(number, latency, peak, status, source)
    record.latency_spread_s, record.predicted_peak_bytes, record.predicted_latency_s = (
        spread,
        predicted_peak,
        predicted_latency,
    )
    return record


def test_the_plot_fits_its_axes_to_the_data_and_labels_every_point():
    import matplotlib.pyplot as plt

    from advisor.run.report import figure

    trials = [spread_trial(0, 1.0, 0.05, 480 * MB, 500 * MB, 0.9), spread_trial(1, 1.2, 0.02, 470 * MB, 490 * MB, 1.1)]
    far = TuneResult("study", "sqlite:///x.db", 12 * 1024 * MB, trials, trials[0], None, 2)
    fig = figure(far)
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    # A 12 GB budget beside ~0.5 GB points: the axis holds the points (in MB), not 0..12 GB.
    assert 400 < low < 470 and 500 < high < 600 and "MB" in ax.get_xlabel()
    texts = [t.get_text() for t in ax.texts]
    assert "0" in texts and "1" in texts  # every trial numbered
    assert any(t.startswith("budget 12.00 GB") and t.endswith("\u2192") for t in texts)  # beyond the right edge
    # Error bars from the measured spread: trial 0's bar spans 0.95..1.05 s.
    segments = [seg for coll in ax.collections for seg in getattr(coll, "get_segments", lambda: [])()]
    assert any(abs(seg[0][1] - 0.95) < 1e-9 and abs(seg[1][1] - 1.05) < 1e-9 for seg in segments if len(seg) == 2)
    plt.close(fig)

    near = TuneResult("study", "sqlite:///x.db", 520 * MB, trials, trials[0], None, 2)
    fig = figure(near)
    low, high = fig.axes[0].get_xlim()
    assert low < 470 and high > 520  # the budget line is inside the axes
    plt.close(fig)


def test_a_study_where_nothing_fits_still_plots_the_predicted_candidates():
    import matplotlib.pyplot as plt

    from advisor.run.report import figure

    skipped = [
        spread_trial(n, None, None, None, (500 + n) * MB, 0.01, status="skipped", source="estimate") for n in range(3)
    ]
    for record in skipped:
        record.feasible = False
    fig = figure(TuneResult("study", "sqlite:///x.db", 300 * MB, skipped, None, None, 3))
    ax = fig.axes[0]
    offsets = [tuple(o) for coll in ax.collections for o in coll.get_offsets()]
    assert len(offsets) == 3 and all(0.009 < y < 0.011 for _, y in offsets)
    low, high = ax.get_xlim()
    assert low < 300 < 502 < high  # the budget and the candidates, all visible
    assert "nothing fits" in ax.get_title(loc="left")
    plt.close(fig)


def test_summary_says_lossless_where_the_cli_does():
    """A measured lossless configuration has no PSNR to show: summary.md says "lossless", as the
    CLI's table does, not "-" (which stays for what was not measured)."""
    from advisor.render import format_quality

    plain = trial(0, 2.0, 500 * MB)  # {}: the default config, bf16 with nothing lossy
    quantized = trial(1, 1.5, 400 * MB)
    quantized.config = {
        "schema_version": 2,  # stored by an older advisor: read through the schema's migrations
        "quantization": {"backend": "bitsandbytes_4bit", "components": ["transformer"]},
    }
    unmeasured = trial(2, None, None, "oom")
    rows = {line.split(" | ")[0]: line for line in markdown(result([plain, quantized, unmeasured])).splitlines()}
    assert format_quality(plain) == "lossless" and "| lossless |" in rows["| 0"]
    assert format_quality(quantized) == "-" and "| lossless |" not in rows["| 1"]
    assert "| lossless |" not in rows["| 2"]


def test_nothing_fits_advice_suggests_only_what_could_help():
    """More --trials helps only where the space has untried configurations, --no-prune only where the
    estimate skipped some; the smallest measured peak is said either way."""
    from advisor.run.results import nothing_fits_advice

    over = [trial(0, 1.0, 900 * MB, "over-budget"), trial(1, 1.2, 800 * MB, "over-budget")]
    exhausted = nothing_fits_advice(over, 700 * MB, space_size=2)
    assert "800.00 MB (config 1)" in exhausted[0]
    assert "more --trials" not in exhausted[-1] and "--no-prune" not in exhausted[-1] and "--budget" in exhausted[-1]
    untried = nothing_fits_advice([*over, trial(2, None, None, "skipped", "estimate")], 700 * MB, space_size=10)
    assert "more --trials" in untried[-1] and "--no-prune" in untried[-1]
