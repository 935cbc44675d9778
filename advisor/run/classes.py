"""A pipeline layout (`advisor.probe.layout`) with what the run tier asks of its component classes.

The questions (is it a torch module, a diffusers model; does its class have ``_repeated_blocks``,
``enable_tiling``; which modules does it keep in float32) are answered from the real classes when a
pipeline is loaded (`Components.of_pipe`). For a model that is not loaded (`Components.of_model`:
``--emit python``, the checks before loading) they come from the generated class table
(``advisor/data/diffusers.json``, when it was made from the installed diffusers) and from the names
that are never models (tokenizers, schedulers): importing diffusers and transformers takes seconds,
torch included. A class is imported only when neither knows it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from advisor.packages import installed_version
from advisor.probe.layout import (
    NOT_MODELS,
    ComponentEntry,
    PipelineLayout,
    diffusers_tables,
    layout_of_components,
    read_layout,
)


def _resolve_class(library: str | None, class_name: str | None) -> type | None:
    if not class_name:
        return None
    for lib in [library] if library else ["diffusers", "transformers"]:
        try:
            found = getattr(importlib.import_module(lib), class_name, None)
        except Exception:  # an optional library that is not installed
            found = None
        if isinstance(found, type):
            return found
    return None


@dataclass(frozen=True)
class ClassFacts:
    """What the run tier asks of a component class, as the class table records it."""

    module: bool  # a torch.nn.Module
    diffusers_model: bool  # a diffusers ModelMixin
    attrs: dict[str, bool]  # has_attr answers the table holds: _repeated_blocks, enable_tiling, enable_slicing
    keep_in_fp32: tuple[str, ...]  # the class's _keep_in_fp32_modules


@lru_cache(maxsize=1)
def tables_describe_installed_diffusers() -> bool:
    """Whether the class table was generated from the installed diffusers (or none is installed)."""
    installed = installed_version("diffusers")
    return installed is None or installed == diffusers_tables()["diffusers_version"]


def table_facts(entry: ComponentEntry | None) -> ClassFacts | None:
    """The class table's facts about a component's class, or None when it doesn't know the class."""
    if entry is None or not tables_describe_installed_diffusers():
        return None
    tables = diffusers_tables()
    if entry.library in ("diffusers", None) and entry.class_name in tables["models"]:
        model = tables["models"][entry.class_name]
        attrs = {
            "_repeated_blocks": bool(model["repeated_blocks"]),
            "enable_tiling": model["tiling"],
            "enable_slicing": model["slicing"],
        }
        return ClassFacts(True, True, attrs, tuple(model["keep_in_fp32_modules"]))
    if entry.library in ("transformers", None) and entry.class_name in tables["transformers_models"]:
        return ClassFacts(
            True, False, {}, tuple(tables["transformers_models"][entry.class_name]["keep_in_fp32_modules"])
        )
    return None


@dataclass
class Components:
    """What a pipeline holds, with facts about its classes: from a loaded pipe, a model's layout, or nothing known.

    ``classes`` holds the real classes (all of them for a loaded pipe; for a layout, those that had
    to be imported because the table and the names did not tell).
    """

    layout: PipelineLayout
    classes: dict[str, type | None] = field(default_factory=dict)
    from_tables: bool = False  # a layout (not a loaded pipe): ask the class table before importing a class
    model: str | None = (
        None  # where it loads from (a Hub id or a folder): a component loaded apart reads its config there
    )

    @classmethod
    def of_pipe(cls, pipe: Any) -> Components:
        objects = {name: obj for name, obj in pipe.components.items() if obj is not None}
        return cls(
            layout_of_components(objects, type(pipe).__name__), {name: type(obj) for name, obj in objects.items()}
        )

    @classmethod
    def of_model(cls, model: str | Path | None) -> Components:
        return cls(read_layout(model), from_tables=True, model=None if model is None else str(model))

    @property
    def known(self) -> bool:
        return self.layout.known

    @property
    def pipeline_class(self) -> str | None:
        return self.layout.pipeline_class

    def names(self) -> list[str]:
        return self.layout.names()

    def cls(self, name: str) -> type | None:
        """The component's class, imported if need be (None when it can't be: unknown, or its library is missing)."""
        if name not in self.classes:
            entry = self.layout.entry(name)
            self.classes[name] = _resolve_class(entry.library, entry.class_name) if entry is not None else None
        return self.classes[name]

    def _facts(self, name: str) -> ClassFacts | None:
        if not self.from_tables or self.classes.get(name) is not None:
            return None
        return table_facts(self.layout.entry(name))

    def _never_a_model(self, name: str) -> bool:
        """A tokenizer, scheduler or processor by its name, when its class is not imported (it need not be)."""
        return self.from_tables and self.classes.get(name) is None and name.startswith(NOT_MODELS)

    def class_name(self, name: str) -> str:
        cls = self.classes.get(name)
        return cls.__name__ if cls is not None else self.layout.class_name(name)

    def is_module(self, name: str) -> bool:
        facts = self._facts(name)
        if facts is not None:
            return facts.module
        if self._never_a_model(name):
            return False
        cls = self.cls(name)
        if cls is not None:
            import torch

            return issubclass(cls, torch.nn.Module)
        return not name.startswith(NOT_MODELS)

    def is_diffusers_model(self, name: str) -> bool:
        facts = self._facts(name)
        if facts is not None:
            return facts.diffusers_model
        if self._never_a_model(name):
            return False
        cls = self.cls(name)
        if cls is not None:
            from diffusers import ModelMixin

            return issubclass(cls, ModelMixin)
        entry = self.layout.entry(name)
        if entry is not None and entry.library is not None:
            return entry.library == "diffusers" and self.is_module(name)
        return not name.startswith(("text_encoder", "image_encoder", *NOT_MODELS))

    def modules(self) -> list[str]:
        return [name for name in self.names() if self.is_module(name)]

    def denoisers(self) -> list[str]:
        if not self.known:
            return ["transformer"]
        return [
            name for name in self.modules()
            if self.layout.role(name) == "denoiser" and self.is_diffusers_model(name)
        ]  # fmt: skip

    def has_attr(self, name: str, attr: str) -> bool:
        """Whether the component's class has `attr` set to something (an empty list is nothing:
        SD3's ``_repeated_blocks = []`` makes ``compile_repeated_blocks`` raise); unknown classes pass."""
        facts = self._facts(name)
        if facts is not None and attr in facts.attrs:
            return facts.attrs[attr]
        cls = self.cls(name)
        if cls is None:
            return True
        value = getattr(cls, attr, None)
        return value is not None and value != [] and value != ()

    def keep_in_fp32(self, name: str) -> tuple[str, ...]:
        """The class's ``_keep_in_fp32_modules`` (empty when unknown)."""
        facts = self._facts(name)
        if facts is not None:
            return facts.keep_in_fp32
        cls = self.cls(name)
        return tuple(getattr(cls, "_keep_in_fp32_modules", None) or ()) if cls is not None else ()
