"""A pipeline layout (`advisor.probe.layout`) with its class names resolved to classes, for the run tier.

Resolving imports diffusers and transformers, so it happens here and not in the probe.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advisor.probe.layout import NOT_MODELS, PipelineLayout, layout_of_components, read_layout


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


@dataclass
class Components:
    """What a pipeline holds, with classes: from a loaded pipe, a model's layout, or nothing known."""

    layout: PipelineLayout
    classes: dict[str, type | None] = field(default_factory=dict)

    @classmethod
    def of_pipe(cls, pipe: Any) -> Components:
        objects = {name: obj for name, obj in pipe.components.items() if obj is not None}
        return cls(layout_of_components(objects, type(pipe).__name__), {name: type(obj) for name, obj in objects.items()})

    @classmethod
    def of_model(cls, model: str | Path | None) -> Components:
        layout = read_layout(model)
        classes = {name: _resolve_class(e.library, e.class_name) for name, e in (layout.entries or {}).items()}
        return cls(layout, classes)

    @property
    def known(self) -> bool:
        return self.layout.known

    @property
    def pipeline_class(self) -> str | None:
        return self.layout.pipeline_class

    def names(self) -> list[str]:
        return self.layout.names()

    def cls(self, name: str) -> type | None:
        return self.classes.get(name)

    def class_name(self, name: str) -> str:
        cls = self.cls(name)
        return cls.__name__ if cls is not None else self.layout.class_name(name)

    def is_module(self, name: str) -> bool:
        import torch

        cls = self.cls(name)
        if cls is not None:
            return issubclass(cls, torch.nn.Module)
        return not name.startswith(NOT_MODELS)

    def is_diffusers_model(self, name: str) -> bool:
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
        cls = self.cls(name)
        if cls is None:
            return True
        value = getattr(cls, attr, None)
        return value is not None and value != [] and value != ()
