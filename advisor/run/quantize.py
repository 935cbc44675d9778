"""Loading: the ``from_pretrained`` arguments a config asks for, and their source code.

Some levers act while the weights load, not after (quantization: diffusers converts weights through
``PipelineQuantizationConfig``); each says what it adds (`Lever.loading`). `pipeline_kwargs`
builds the real objects; `loading_code` prints the code that builds them (the same data, so they
cannot drift apart).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from advisor.levers import LEVERS, Loading
from advisor.levers.code import dtype_expr
from advisor.run.classes import Components


if TYPE_CHECKING:
    from advisor.config import OptimizationConfig


def loadings(config: OptimizationConfig, components: Components) -> list[Loading]:
    """What each lever adds to ``from_pretrained`` for `config` (`Lever.loading`), in the levers' order."""
    return [loading for lever in LEVERS if (loading := lever.loading(config, components)) is not None]


def dtype_keyword() -> str:
    """diffusers deprecated `torch_dtype` for `dtype` (and warns on every load); older ones only know the former.

    The installed diffusers knows `dtype` when its ``deprecation_utils`` defines ``_resolve_dtype``.
    Unless diffusers is imported already, that is read from the module's source: importing diffusers
    takes seconds (torch with it), and ``--emit python`` needs nothing else from it.
    """
    module = sys.modules.get("diffusers.utils.deprecation_utils")
    if module is None:
        found = _source_defines("diffusers", ("utils", "deprecation_utils.py"), "_resolve_dtype")
        if found is not None:
            return "dtype" if found else "torch_dtype"
        try:
            from diffusers.utils import deprecation_utils as module
        except ImportError:
            return "torch_dtype"
    return "dtype" if hasattr(module, "_resolve_dtype") else "torch_dtype"


def _source_defines(package: str, path: tuple[str, ...], name: str) -> bool | None:
    """Whether a module of an installed package defines `name` at its top level, read without
    importing it; None when the source can't be read (not installed, a zip, no source)."""
    try:
        spec = importlib.util.find_spec(package)  # a top-level package: found, not imported
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        try:
            text = Path(folder, *path).read_text(encoding="utf-8")
        except OSError:
            continue
        return re.search(rf"^(?:def|class) {re.escape(name)}\b|^{re.escape(name)}\s*=", text, re.MULTILINE) is not None
    return None


def pipeline_kwargs(config: OptimizationConfig, model: str | Path | None = None) -> dict[str, Any]:
    """What ``DiffusionPipeline.from_pretrained`` needs: the dtype and, if any, ``quantization_config``.

    The dtype keyword is ``dtype`` on diffusers versions that deprecate ``torch_dtype`` (0.42.1 warns
    on every load), else ``torch_dtype``. `model` (or ``config.provenance.model``) lets torchao pick
    diffusers' or transformers' ``TorchAoConfig`` per component from the model's ``model_index.json``;
    without it, ``text_encoder*`` / ``image_encoder*`` count as transformers models.

    >>> pipe = DiffusionPipeline.from_pretrained(model, **pipeline_kwargs(config, model))  # doctest: +SKIP
    """
    kwargs: dict[str, Any] = {dtype_keyword(): dtype_expr(config.dtype).evaluate()}
    for loading in loadings(config, _components_for_loading(config, model)):
        kwargs[loading.keyword] = loading.build()
    return kwargs


def loading_code(config: OptimizationConfig, model: str | Path | None = None) -> str | None:
    """The source that builds `pipeline_kwargs(config)`'s values beside the dtype, or None."""
    code = [loading.code for loading in loadings(config, _components_for_loading(config, model)) if loading.code]
    return "\n".join(code) if code else None


def _components_for_loading(config: OptimizationConfig, model: str | Path | None) -> Components:
    components = Components.of_model(model)
    if not components.known and model is None and config.provenance.model:
        components = Components.of_model(config.provenance.model)
    return components
