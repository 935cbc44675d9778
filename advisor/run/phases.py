"""The peak GPU memory of each phase of one generation (text encoding, denoising, VAE decode).

On CUDA, one timed generation of a trial (`advisor.run.measure`) records the peak of each phase,
to set against the estimate's per-phase device bytes (`advisor.plan.estimate`).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

from advisor.plan.estimate import ROLE_OF_PHASE


# The estimate's phases (`advisor.plan.estimate.PHASES`) by the role (`advisor.probe.layout.role_of`)
# of the components whose calls make them; tests/test_measure.py checks it against the estimate's table.
PHASE_OF_ROLE = {role: phase for phase, role in ROLE_OF_PHASE.items()}  # the estimate's phases


class PhasePeaks:
    """The peak device memory of each phase of one generation, from phase starts and a peak counter.

    In a trial `read_peak` and `reset` are ``torch.cuda.max_memory_allocated`` and
    ``torch.cuda.reset_peak_memory_stats``. They are parameters so that this bookkeeping can be
    tested with a fake counter on a CPU, which has no allocator peak to read.

    A phase starts when an outermost call of one of its components begins (`enter`) while another
    phase runs: the counter is read for the phase that ends, then reset. So the peak of a phase is
    the highest allocation from its start to the next phase's start, everything resident included
    (what the estimate's per-phase device bytes predict); a phase that comes back keeps the highest
    of its intervals. Calls made inside a component's call (until its `exit`) never change the phase.
    What ran before the first phase is nobody's (a trial keeps it in its overall peak); `finish`
    closes the last phase at the end of the generation.
    """

    def __init__(self, read_peak: Callable[[], int], reset: Callable[[], None]) -> None:
        self.read_peak, self.reset = read_peak, reset
        self.peaks: dict[str, int] = {}
        self.order: list[str] = []  # the phases in the order they started
        self.current: str | None = None
        self.depth = 0  # component calls in progress

    def enter(self, phase: str) -> None:
        if self.depth == 0 and phase != self.current:
            self._close()
            self.current = phase
            self.order.append(phase)
        self.depth += 1

    def exit(self) -> None:
        self.depth = max(self.depth - 1, 0)

    def finish(self) -> dict[str, int]:
        """Close the phase running and return phase -> peak bytes."""
        self._close()
        self.current, self.depth = None, 0
        return dict(self.peaks)

    def _close(self) -> None:
        peak = int(self.read_peak())
        if self.current is not None:
            self.peaks[self.current] = max(self.peaks.get(self.current, 0), peak)
        self.reset()


def _bracket(obj: Any, attr: str, phase: str, phases: PhasePeaks) -> Callable[[], None]:
    """Replace ``obj.attr`` (a callable) by one that marks `phase` around it; returns the undo."""
    own = attr in vars(obj)
    original = getattr(obj, attr)

    @functools.wraps(original)
    def marked(*args: Any, **kwargs: Any) -> Any:
        phases.enter(phase)
        try:
            return original(*args, **kwargs)
        finally:
            phases.exit()

    setattr(obj, attr, marked)
    return (lambda: setattr(obj, attr, original)) if own else (lambda: delattr(obj, attr))


@contextlib.contextmanager
def watching_phases(pipe: Any, phases: PhasePeaks) -> Iterator[dict[str, str]]:
    """Report `pipe`'s phase starts to `phases` while inside; yields component name -> its phase.

    Components are placed by role, as everywhere else (`advisor.run.classes.Components`, roles from
    `advisor.probe.layout.role_of`): text encoders, denoisers (transformer, Wan2.2's transformer_2,
    unet) and the VAE. A forward pre-hook enters the phase and a forward hook (``always_call``)
    leaves it. Two exceptions:

    - a module compiled whole (``module.compile()``) runs its hooks inside the compiled frame, where
      dynamo cannot call the allocator (with fullgraph it fails): its compiled call is wrapped;
    - the VAE's work is ``decode`` (``post_quant_conv``, every tile, the decoder), not ``forward``:
      its bound ``decode`` is wrapped, outside diffusers' ``apply_forward_hook``, so the weights
      model offload brings in count in the phase too.

    Both run before any offload hook (accelerate's and diffusers' replace ``forward``), so moving a
    component's weights in is part of its phase. Everything is removed on leaving.
    """
    from advisor.run.classes import Components

    components = Components.of_pipe(pipe)
    objects = pipe.components
    undo: list[Callable[[], None]] = []
    watched: dict[str, str] = {}
    try:
        for name in components.modules():
            phase = PHASE_OF_ROLE.get(components.layout.role(name))
            module = objects.get(name)
            if phase is None or module is None:
                continue
            if phase == "vae_decode" and callable(getattr(module, "decode", None)):
                undo.append(_bracket(module, "decode", phase, phases))
            elif getattr(module, "_compiled_call_impl", None) is not None:
                undo.append(_bracket(module, "_compiled_call_impl", phase, phases))
            else:
                pre = module.register_forward_pre_hook(lambda _module, _args, phase=phase: phases.enter(phase))
                post = module.register_forward_hook(lambda _module, _args, _output: phases.exit(), always_call=True)
                undo += [pre.remove, post.remove]
            watched[name] = phase
        yield watched
    finally:
        for step in reversed(undo):
            step()
