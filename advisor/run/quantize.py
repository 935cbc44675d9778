"""Quantization at load time: the ``from_pretrained`` arguments a config asks for, and their source code.

Quantization is not a post-load step: diffusers converts weights while loading through
``PipelineQuantizationConfig``. `pipeline_kwargs` builds the real objects; `quantization_code`
prints the code that builds them (the same data, so they cannot drift apart).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from advisor.errors import ConfigError
from advisor.levers.code import call_source, dtype_expr, runtime_value, source
from advisor.run.classes import Components


if TYPE_CHECKING:
    from advisor.config import OptimizationConfig

# torchao scheme -> the AOBaseConfig class in torchao.quantization that implements it.
TORCHAO_SCHEMES = {
    "int8_weight_only": "Int8WeightOnlyConfig",
    "int8_dynamic": "Int8DynamicActivationInt8WeightConfig",
    "float8_weight_only": "Float8WeightOnlyConfig",
    "float8_dynamic": "Float8DynamicActivationFloat8WeightConfig",
    "int4_weight_only": "Int4WeightOnlyConfig",
}


@dataclass(frozen=True)
class LoadQuantization:
    imports: tuple[str, ...]
    code: str  # `pipeline_quant_config = PipelineQuantizationConfig(...)`
    build: Callable[[], Any]


def load_quantization(config: OptimizationConfig, components: Components) -> LoadQuantization | None:
    q = config.quantization
    if q is None:
        return None
    imports = ("from diffusers.quantizers import PipelineQuantizationConfig",)
    if q.backend in ("bitsandbytes_4bit", "bitsandbytes_8bit"):
        if q.backend == "bitsandbytes_4bit":
            quant_kwargs: dict[str, Any] = {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": q.quant_type or "nf4",
                "bnb_4bit_compute_dtype": dtype_expr(config.dtype),
            }
            if q.double_quant:
                quant_kwargs["bnb_4bit_use_double_quant"] = True
        else:
            quant_kwargs = {"load_in_8bit": True}
        kwargs = {
            "quant_backend": q.backend,
            "quant_kwargs": quant_kwargs,
            "components_to_quantize": list(q.components),
        }

        def build() -> Any:
            from diffusers.quantizers import PipelineQuantizationConfig

            return PipelineQuantizationConfig(**runtime_value(kwargs))

        return LoadQuantization(
            imports, "pipeline_quant_config = " + call_source("PipelineQuantizationConfig", (), kwargs), build
        )

    # torchao: diffusers' and transformers' TorchAoConfig take different arguments, so diffusers
    # refuses `quant_backend="torchao"` ("signatures ... don't match"): each component gets the
    # config class of the library it belongs to, through `quant_mapping`.
    scheme_class = TORCHAO_SCHEMES[q.scheme or "int8_weight_only"]
    mapping = {name: components.is_diffusers_model(name) for name in q.components}
    imports += (f"from torchao.quantization import {scheme_class}",)
    if any(mapping.values()):
        imports += ("from diffusers import TorchAoConfig",)
    if not all(mapping.values()):
        imports += ("from transformers import TorchAoConfig as TransformersTorchAoConfig",)
    lines = ["pipeline_quant_config = PipelineQuantizationConfig(", "    quant_mapping={"]
    for name, is_diffusers in mapping.items():
        callee = "TorchAoConfig" if is_diffusers else "TransformersTorchAoConfig"
        lines.append(f"        {source(name)}: {callee}({scheme_class}()),")
    lines += ["    }", ")"]

    def build_torchao() -> Any:
        import diffusers
        import transformers

        try:
            import torchao.quantization
        except ImportError:
            raise ConfigError(
                "`quantization.backend: torchao` needs the torchao package, which is not installed here: "
                "pip install torchao (or the advisor's extra: pip install 'diffusers-advisor[torchao]')"
            ) from None
        from diffusers.quantizers import PipelineQuantizationConfig

        scheme = getattr(torchao.quantization, scheme_class)
        return PipelineQuantizationConfig(
            quant_mapping={
                name: (diffusers.TorchAoConfig if is_diffusers else transformers.TorchAoConfig)(scheme())
                for name, is_diffusers in mapping.items()
            }
        )

    return LoadQuantization(imports, "\n".join(lines), build_torchao)


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
    quant = load_quantization(config, _components_for_loading(config, model))
    if quant is not None:
        kwargs["quantization_config"] = quant.build()
    return kwargs


def quantization_code(config: OptimizationConfig, model: str | Path | None = None) -> str | None:
    """The source that builds `pipeline_kwargs(config)["quantization_config"]`, or None."""
    quant = load_quantization(config, _components_for_loading(config, model))
    return None if quant is None else quant.code


def _components_for_loading(config: OptimizationConfig, model: str | Path | None) -> Components:
    components = Components.of_model(model)
    if not components.known and model is None and config.provenance.model:
        components = Components.of_model(config.provenance.model)
    return components
