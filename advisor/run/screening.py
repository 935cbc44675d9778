"""Before a tune trial spends a process on a GPU configuration: rehearse it on a virtual GPU.

A trial loads the real weights (minutes for a large model) before a device or dtype mix crashes its
first matmul. The rehearsal (`advisor.rehearse`) runs the same config through the real diffusers
hooks at full size with no weights, in seconds, and names the op that would mix devices or dtypes:
such a config is answered without a trial process. It says nothing about speed, and its memory is
a prediction, so a config it passes is measured as before; so is one a library refused while the
rehearsal applied it (the virtual pipeline is built from the catalog's configs, not the user's
files: the trial decides), with the refusal in the trial's reason.

The rehearsal runs in a child process that sees no GPU (``CUDA_VISIBLE_DEVICES=""``): the virtual
device is the only CUDA it knows, so the tuner's own process never opens a CUDA context on the card
its trials measure, and a rehearsal that hangs or crashes costs one child, not the study.
"""

from __future__ import annotations

import multiprocessing
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from advisor.config import OptimizationConfig
    from advisor.plan.scenario import Scenario


REFUSED = "rehearsed on a virtual GPU, the card would refuse it"
SCREEN_TIMEOUT_S = 600.0  # a full-size rehearsal takes seconds to a minute (docs/benchmarks.md#rehearsals)


@dataclass(frozen=True)
class Screening:
    """What rehearsing a config said before its trial: `refusal`, the one line why the card would
    refuse it (then it is not measured); `note`, what the rehearsal could not tell (then it is
    measured, and the note is part of the trial's reason)."""

    refusal: str | None = None
    note: str | None = None


def screen(scenario: Scenario, config: OptimizationConfig, timeout_s: float = SCREEN_TIMEOUT_S) -> Screening:
    """Rehearse `config` for `scenario`'s workload on a virtual copy of its GPU, in a child process;
    CPU configs pass unrehearsed (a CPU runs what it is given: there is no second device to mix)."""
    if not config.device.startswith("cuda"):
        return Screening()
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state inherited
    receive, send = context.Pipe(duplex=False)
    job = (scenario.profile, scenario.workload, config, scenario.target, scenario.budget_bytes)
    child = context.Process(target=_rehearse_in_child, args=(send, *job), daemon=True)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the child's environment is copied from here as it starts
    try:
        child.start()
    finally:
        if visible is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    send.close()
    try:
        if not receive.poll(timeout_s):
            return Screening(note=f"not rehearsed: no verdict within {timeout_s:g} s")
        return receive.recv()
    except EOFError:  # it died without a word (killed, out of memory)
        child.join()
        return Screening(note=f"not rehearsed: the rehearsal's process ended with exit code {child.exitcode}")
    finally:
        if child.is_alive():
            child.kill()
        child.join()
        receive.close()


def _rehearse_in_child(send: Any, profile: Any, workload: Any, config: Any, target: Any, budget: int) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported, whatever the start method
    try:
        from advisor.rehearse.build import rehearse_planned

        rehearsal = rehearse_planned(profile, workload, config, target, budget)
    except Exception as error:  # a rehearsal bug must not cost the trial: it is measured, and says why
        send.send(Screening(note=f"not rehearsed ({type(error).__name__}: {error})"))
        return
    if rehearsal.failure and rehearsal.mixed_devices:
        send.send(Screening(refusal=f"{REFUSED}: {rehearsal.failure}"))
    elif rehearsal.failure:
        send.send(Screening(note=f"rehearsal: a library refused it while applying it ({rehearsal.failure})"))
    elif rehearsal.not_rehearsed:
        send.send(Screening(note=f"not rehearsed: {rehearsal.not_rehearsed}"))
    else:
        send.send(Screening())
    send.close()
