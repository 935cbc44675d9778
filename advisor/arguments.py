"""The advisor's command line as argparse sees it: the subcommands, their options, and usage errors
that are one `UsageError` line.

argparse, not typer or click: it is in the standard library and imports in a few milliseconds,
where typer took ~210 ms of every `advisor recommend` (issue 15's start-up goal: probe and recommend
within 5% of the time `import diffusers` takes). The commands themselves live in `advisor.cli`.
"""

from __future__ import annotations

import argparse
import difflib
import re
from typing import Any, Callable

from advisor.errors import UsageError
from advisor.plan.quality import CLEAR_WIN
from advisor.plan.scenario import DEFAULT_GENERATIONS
from advisor.run.timing import CONFIRM_RUNS, MIN_PSNR_DB, TOLERANCE, TRIAL_TIMEOUT_S, TRIALS


class Exit(Exception):
    """End the command with this exit status (after what it printed)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse with the advisor's errors: a usage error is one `UsageError` line naming the option
    and where its help is, not argparse's usage block and exit."""

    def error(self, message: str):
        wrong = re.search(r"invalid choice: '([^']*)'", message)
        if wrong and self._subparsers is not None:  # a mistyped command: say the near one, or all of them
            names = [
                name for action in self._subparsers._group_actions for name in getattr(action, "choices", None) or ()
            ]
            near = difflib.get_close_matches(wrong.group(1), names, n=1)
            if not near:
                raise UsageError(f"no such command: {wrong.group(1)!r}; the commands are {', '.join(names)}")
            message = f"no such command: {wrong.group(1)!r}. Did you mean {near[0]!r}?"
        raise UsageError(f"{message} (see '{self.prog} --help')")


def long_options(parser: argparse.ArgumentParser, command: str | None = None) -> list[str]:
    """The long options `command` (or the bare program, with None) takes, as typed."""
    if command is not None:
        parser = next(a.choices[command] for a in parser._subparsers._group_actions if command in (a.choices or {}))
    return [option for option in parser._option_string_actions if option.startswith("--")]


def whole_number(flag: str, example: int) -> Callable[[str], int]:
    """An option's `type`: a whole number, or one `UsageError` line naming the flag (not argparse's
    "argument --steps: invalid int value"); the range is checked where the value is used."""
    return _number_type(flag, int, f"is not a whole number; give e.g. {example}")


def number(flag: str, example: float) -> Callable[[str], float]:
    """An option's `type`: a number, or one `UsageError` line naming the flag."""
    return _number_type(flag, float, f"is not a number; give e.g. {example:g}")


def _number_type(flag: str, convert: Callable[[str], Any], problem: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return convert(text)
        except ValueError:
            raise UsageError(f"{flag}: {text!r} {problem}") from None

    return parse


PLANNED = ("image", "video")  # what estimate, recommend and tune plan
KINDS = ("image", "video", "audio")  # what inspect can be told a pipeline is (advisor.probe.facts.WORKLOADS)


def workload_kind(kinds: tuple[str, ...]) -> Callable[[str], str]:
    """The `type` of --workload: one of `kinds`, in any case (``Video`` is video)."""

    def parse(text: str) -> str:
        kind = text.strip().lower()
        if kind in kinds:
            return kind
        if kind in KINDS:
            raise UsageError(f"--workload: {kind} pipelines are not planned (yet); use one of {', '.join(kinds)}")
        raise UsageError(f"--workload: {text!r} is not a workload; use one of {', '.join(kinds)}")

    return parse


def take_model(namespace: dict) -> None:
    """One ``model`` from MODEL or --model (a command without either gets None and says what it needs)."""
    if "model_argument" not in namespace:
        return
    first, flag = namespace.pop("model_argument"), namespace.get("model")
    for given, name in ((first, "MODEL"), (flag, "--model")):
        if given is not None and not given.strip():  # `-m ""`: a slip, not a request for recommend's default
            raise UsageError(
                f"{name}: the model is empty ({given!r}); give a hub id, a catalog alias (flux-dev) or a local folder "
                "as MODEL or --model"
            )
    if first and flag and first != flag:
        raise UsageError(f"--model: the model is given twice, as {first!r} and as --model {flag!r}; give it once")
    namespace["model"] = first or flag


def values_may_start_with_a_dash(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """``--vram -3GB`` as ``--vram=-3GB``: argparse takes a value starting with "-" for an option,
    and then says "expected one argument" instead of what is wrong with the value."""
    options, valued = set(), set()
    for sub in [parser, *parser._subparsers._group_actions[0].choices.values()]:
        for action in sub._actions:
            options.update(action.option_strings)
            if action.nargs is None and action.option_strings and not isinstance(action, argparse._StoreTrueAction):
                valued.update(action.option_strings)
    out, index = [], 0
    while index < len(args):
        arg = args[index]
        following = args[index + 1] if index + 1 < len(args) else None
        if arg in valued and following is not None and following.startswith("-") and following not in options:
            out.append(f"{arg}={following}")
            index += 2
        else:
            out.append(arg)
            index += 1
    return out


MODEL_HELP = "Hub id, catalog alias, or a local pipeline folder."


def build_parser(commands_by_name: dict[str, Callable[..., None]]) -> argparse.ArgumentParser:
    """The command line: a subcommand per entry of `commands_by_name` (its function runs it, its
    docstring's first line is the help), each option stored under the function's parameter name."""
    parser = _Parser(
        prog="advisor",
        description="Find the fastest way to run a diffusers pipeline within your GPU memory.",
        allow_abbrev=False,
    )
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks instead of one-line errors.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # Option groups several commands share, each defined once. --debug after the command too
    # (SUPPRESS: where it is not given, it leaves the value before the command alone).
    debug = _Parser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="Show full tracebacks instead of one-line errors.",
    )
    # Every command that reads a pipeline takes it first (`advisor estimate flux-dev`) or as --model.
    model = _Parser(add_help=False)
    model.add_argument("model_argument", nargs="?", metavar="MODEL", help=f"{MODEL_HELP} Or give it as --model.")
    model.add_argument("--model", "-m", metavar="MODEL", help=MODEL_HELP)
    job = _Parser(add_help=False)
    job.add_argument(
        "--workload",
        type=workload_kind(PLANNED),
        help="The workload kind of a pipeline the advisor does not know: image or video.",
    )
    for flag, what, example in (
        ("--height", "Height in pixels", 1024),
        ("--width", "Width in pixels", 1024),
        ("--frames", "Video frames", 81),
        ("--steps", "Denoising steps the latency is for", 28),
    ):
        job.add_argument(
            flag, type=whole_number(flag, example), metavar="N", help=f"{what} (default: the pipeline's)."
        )
    job.add_argument(
        "--batch", type=whole_number("--batch", 2), metavar="N", help="Images or videos per prompt (default 1)."
    )
    job.add_argument(
        "--guidance-scale",
        type=number("--guidance-scale", 3.5),
        metavar="X",
        help="The guidance scale the pipeline is called with: at or below 1 (0 for Z-Image) it runs without "
        "classifier-free guidance, one denoiser call per step (default: the pipeline's, or the model card's).",
    )
    job.add_argument(
        "--lora",
        dest="loras",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="A LoRA the pipeline runs with (repeatable): a .safetensors file (diffusers, kohya, XLabs or "
        "original layout; read from its header, never loaded) or a Hub file in the local cache (repo/name/file), "
        "with its scale after a colon (x.safetensors:0.8; a Windows drive's colon stays part of the path).",
    )
    job.add_argument(
        "--lora-rank",
        type=whole_number("--lora-rank", 16),
        metavar="N",
        help="Plan for LoRAs of this rank when the files are not at hand (assumed on every Linear layer "
        "of the denoiser: the most a LoRA of that rank adds).",
    )
    job.add_argument(
        "--lora-count",
        type=whole_number("--lora-count", 2),
        metavar="N",
        help="How many LoRAs of --lora-rank run together (default 1).",
    )
    job.add_argument(
        "--lora-swap",
        action="store_true",
        help="Other LoRAs are loaded between calls (a UI, a server): the plan keeps them swappable (no fusing; "
        "hotswapping where the model is compiled, so a new LoRA does not recompile it).",
    )
    process = _Parser(add_help=False)  # what a plan that chooses compile or not weighs
    process.add_argument(
        "--generations",
        type=whole_number("--generations", 100),
        metavar="N",
        help=f"Generations one process makes: torch.compile's one-off warm-up is spread over them "
        f"(default: {DEFAULT_GENERATIONS}, said as an assumption, or --images; 1 for a script that makes one).",
    )
    process.add_argument(
        "--images",
        type=whole_number("--images", 100),
        metavar="N",
        help="Images (or videos) the job makes in all: with several GPUs, one pipeline per card shares them out "
        "(default: one at a time, ranked by its latency; docs/multi-gpu.md).",
    )
    machine = _Parser(add_help=False)
    machine.add_argument("--vram", metavar="SIZE", help="Plan for a GPU with this much memory, e.g. 24GB.")
    machine.add_argument("--ram", metavar="SIZE", help="Plan for this much host RAM, e.g. 64GB.")
    machine.add_argument(
        "--gpu",
        metavar="NAME",
        action="append",
        help="Plan for this GPU model, e.g. 'RTX 4090' (docs/gpus.md lists them); several cards of it as "
        "'2x RTX 4090' or --gpu repeated (docs/multi-gpu.md).",
    )
    machine.add_argument(
        "--os",
        metavar="OS",
        help="The operating system of the machine --gpu or --vram describes: linux (default, said as an "
        "assumption) or windows.",
    )
    as_json = _Parser(add_help=False)
    as_json.add_argument("--json", dest="as_json", action="store_true", help="Print one JSON object.")

    def subcommand(name: str, *groups: argparse.ArgumentParser) -> argparse.ArgumentParser:
        function = commands_by_name[name]
        summary = (function.__doc__ or "").strip().splitlines()[0]
        sub = commands.add_parser(
            name, help=summary, description=summary, allow_abbrev=False, parents=[debug, *groups]
        )
        sub.set_defaults(run=function)
        return sub

    sub = subcommand("probe", as_json)
    sub.add_argument(
        "--calibrate",
        action="store_true",
        help="Also measure matmul throughput and host->GPU bandwidth (a few seconds; imports torch).",
    )

    sub = subcommand("inspect", model, as_json)
    sub.add_argument(
        "--workload",
        type=workload_kind(KINDS),
        help="The workload kind of a pipeline the advisor does not know: image, video or audio.",
    )
    sub.add_argument(
        "--config", dest="include_config", action="store_true", help="With --json: include each component's config."
    )

    sub = subcommand("estimate", model, job, machine, as_json)
    sub.add_argument(
        "--config",
        dest="config_file",
        metavar="FILE",
        help="An advisor config file (default: plain bf16, no offload).",
    )
    sub.add_argument(
        "--budget",
        metavar="SIZE",
        help="GPU memory to judge the fit against (default: the budget --config was planned for on the same "
        "card, else free VRAM minus a reserve).",
    )

    sub = subcommand("recommend", model, job, process, machine, as_json)
    sub.add_argument(
        "--budget", metavar="SIZE", help="GPU memory the run may use, e.g. 16GB (default: free VRAM minus a reserve)."
    )
    sub.add_argument(
        "--no-compile", action="store_true", help="Leave torch.compile out (no warm-up compile on the first call)."
    )
    sub.add_argument(
        "--quality",
        default="balanced",
        help="exact: nothing lossy; balanced (default): lossy only when nothing lossless fits or it is "
        f">={CLEAR_WIN * 100:g}%% faster; "
        "fast: the fastest.",
    )
    sub.add_argument(
        "--output", "-o", metavar="FILE", help="Write the chosen config to this file (for advisor.load_config)."
    )
    sub.add_argument("--emit", help="Print code instead of the summary: 'python'.")

    sub = subcommand("check", job, machine, as_json)
    sub.add_argument("config_file", metavar="CONFIG", help="An advisor config file (from recommend -o or tune).")
    sub.add_argument("--model", "-m", metavar="MODEL", help=f"{MODEL_HELP} (default: the model the config records).")

    sub = subcommand("tune", model, job, process, as_json)
    sub.add_argument(
        "--budget",
        required=True,
        metavar="SIZE",
        help="Memory the run may use, e.g. 12GB (GPU memory; RAM on a CPU-only machine).",
    )
    sub.add_argument(
        "--trials",
        type=whole_number("--trials", TRIALS),
        default=TRIALS,
        metavar="N",
        help="Distinct configurations the study should measure (default %(default)d; a rerun resumes up to this).",
    )
    sub.add_argument(
        "--trial-timeout",
        type=number("--trial-timeout", TRIAL_TIMEOUT_S),
        default=TRIAL_TIMEOUT_S,
        metavar="SECONDS",
        help="Seconds one trial may take before it counts as a timeout (default %(default)g).",
    )
    sub.add_argument(
        "--tolerance",
        type=number("--tolerance", TOLERANCE),
        default=TOLERANCE,
        metavar="FRACTION",
        help=f"Time rounds until the latency's spread is within this fraction of it (default {TOLERANCE:g}: ±{TOLERANCE * 100:g}%%), "
        "else mark the trial noisy.",
    )
    sub.add_argument(
        "--confirm",
        type=whole_number("--confirm", CONFIRM_RUNS),
        default=CONFIRM_RUNS,
        metavar="N",
        help="After the search, measure the finalists N more times each in fresh processes, taking turns, "
        "and pick on the median across processes (default %(default)d; 0: off).",
    )
    sub.add_argument(
        "--min-psnr",
        type=number("--min-psnr", MIN_PSNR_DB),
        default=MIN_PSNR_DB,
        metavar="DB",
        help="A lossy candidate's output must be within this PSNR of the lossless reference, same seed, "
        "prompt and steps; under it the candidate is infeasible (default %(default)g; 0: no check).",
    )
    sub.add_argument(
        "--retry-failed",
        action="store_true",
        help="Measure again the trials that failed in earlier runs, out-of-memory ones too.",
    )
    sub.add_argument(
        "--no-prune", action="store_true", help="Measure candidates the estimate predicts far over budget too."
    )
    sub.add_argument(
        "--no-rehearse",
        action="store_true",
        help="Measure GPU candidates without rehearsing them on a virtual GPU first (what `advisor check` does).",
    )
    sub.add_argument(
        "--no-compile", action="store_true", help="Leave torch.compile out of the search (faster trials)."
    )
    sub.add_argument(
        "--quality", default="balanced", help="exact: search lossless configurations only; balanced or fast: all."
    )
    sub.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna storage: sqlite:///PATH (default ~/.cache/advisor/studies.db), journal:PATH, postgresql://...",
    )
    sub.add_argument(
        "--study", metavar="NAME", help="Study name (default: derived from model, workload, machine and budget)."
    )
    sub.add_argument(
        "--workers",
        type=whole_number("--workers", 2),
        default=1,
        metavar="N",
        help="Worker processes sharing the study, one per GPU (needs a journal or PostgreSQL storage).",
    )
    sub.add_argument("--output", "-o", metavar="FILE", help="Write the fastest feasible config to this file.")
    sub.add_argument(
        "--report", metavar="DIR", help="Write tune.png (latency against peak memory) and summary.md to this folder."
    )
    sub.add_argument("--quiet", action="store_true", help="No progress display or table (used by worker processes).")
    return parser
