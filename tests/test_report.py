"""The tuning report: Pareto front, plot and Markdown summary from trial records."""

from advisor.run.report import markdown, pareto_front, write_report
from advisor.run.trials import TrialRecord
from advisor.run.tune import TuneResult

MB = 2**20


def trial(number, latency, peak, status="ok", source="measured"):
    return TrialRecord(number, f"config {number}", status, source, status == "ok", latency, peak, peak, None, {})


def result(trials, best=None):
    return TuneResult("study", "sqlite:///x.db", 700 * MB, trials, best, None, len(trials))


def test_pareto_front_keeps_only_undominated_measured_trials():
    trials = [trial(0, 3.0, 500 * MB), trial(1, 2.0, 600 * MB), trial(2, 2.5, 650 * MB), trial(3, 1.0, 900 * MB, "over-budget"),
              trial(4, None, None, "oom"), trial(5, 0.5, 400 * MB, "skipped", "estimate")]
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
