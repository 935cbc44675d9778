"""What a lever's apply step is: the code a user would write, and the function that does it.

A `Step` has a one-line description, the exact Python ``code`` (it refers to ``pipe``) and a ``run``
function that performs it: `advisor.run.apply` runs the steps, `advisor.run.emit` prints their code,
so a generated script and ``advisor.load_pipeline`` cannot drift apart. Values that know the Python
source producing them (`Expr`: ``torch_expr("bfloat16")`` runs as ``torch.bfloat16`` and prints as
``torch.bfloat16``) let one object both run and print; plain values print as Python literals
(strings with double quotes, like the diffusers docs). Values that need torch are looked up only
when a step runs, so printing the steps (``--emit python``) never imports it.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable


@dataclass(frozen=True)
class Expr:
    """A value together with the source that produces it, e.g. ``torch.bfloat16``.

    ``value`` is the value itself or, with ``lazy``, a function returning it, called by `evaluate`.
    """

    code: str
    value: Any
    lazy: bool = False

    def evaluate(self) -> Any:
        return self.value() if self.lazy else self.value


def torch_expr(name: str) -> Expr:
    """``torch.<name>`` (a dtype, ``channels_last``), imported when the value is first needed."""

    def value() -> Any:
        import torch

        return getattr(torch, name)

    return Expr(f"torch.{name}", value, lazy=True)


def dtype_expr(name: str) -> Expr:
    return torch_expr(name)


def source(value: Any) -> str:
    """The Python source of `value`."""
    if isinstance(value, Expr):
        return value.code
    if isinstance(value, str):
        return json.dumps(value)  # double quotes, like the diffusers docs
    if isinstance(value, dict):
        return "{" + ", ".join(f"{source(k)}: {source(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(source(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(source(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)  # bool, int, float, None


def runtime_value(value: Any) -> Any:
    """`value` with every `Expr` replaced by what it evaluates to."""
    if isinstance(value, Expr):
        return value.evaluate()
    if isinstance(value, dict):
        return {k: runtime_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(runtime_value(v) for v in value)
    return value


def call_source(callee: str, args: Iterable[Any] = (), kwargs: dict[str, Any] | None = None) -> str:
    """``callee(arg, key=value)``, on one line when it fits 120 columns, else one argument per line."""
    parts = [source(a) for a in args] + [f"{k}={source(v)}" for k, v in (kwargs or {}).items()]
    one_line = f"{callee}({', '.join(parts)})"
    if len(one_line) <= 120:
        return one_line
    return f"{callee}(\n" + "".join(f"    {part},\n" for part in parts) + ")"


# --- steps ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One post-load action: what it does, the code a user would write, and the function doing it."""

    key: str  # the config key it comes from: compile, layerwise_casting, offload, vae, ...
    description: str
    code: str
    run: Callable[[Any], None] = field(repr=False, compare=False)
    imports: tuple[str, ...] = ()
    # Done already where the pipeline loaded as the plan says (``load_pipeline``, the emitted script):
    # only ``apply_config``, given a pipeline loaded some other way, runs it.
    done_by_loading: bool = False
    # What a rehearsal runs instead, where ``run`` needs what the plan only assumed (a LoRA of a given
    # rank, no file): a stand-in of the same shapes (`advisor.rehearse`).
    stand_in: Callable[[Any], None] | None = field(default=None, repr=False, compare=False)

    def __call__(self, pipe: Any) -> None:
        self.run(pipe)


def method_step(
    key: str,
    description: str,
    component: str | None,
    method: str,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    imports: tuple[str, ...] = (),
    *,
    done_by_loading: bool = False,
) -> Step:
    kwargs = dict(kwargs or {})
    obj = "pipe" if component is None else f"pipe.{component}"

    def run(pipe: Any) -> None:
        target = pipe if component is None else getattr(pipe, component)
        getattr(target, method)(*[runtime_value(a) for a in args], **runtime_value(kwargs))

    return Step(key, description, call_source(f"{obj}.{method}", args, kwargs), run, imports, done_by_loading)


def function_step(key: str, description: str, module: str, name: str, component: str, kwargs: dict[str, Any]) -> Step:
    kwargs = dict(kwargs)

    def run(pipe: Any) -> None:
        getattr(importlib.import_module(module), name)(getattr(pipe, component), **runtime_value(kwargs))

    code = call_source(name, [Expr(f"pipe.{component}", None)], kwargs)
    return Step(key, description, code, run, (f"from {module} import {name}",))
