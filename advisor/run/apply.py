"""Turn an `OptimizationConfig` into a loaded, optimized diffusers pipeline, or into the script that does it.

Everything a config asks for after loading is a list of `Step` objects (`plan`): each has a one-line
``description``, the exact Python ``code`` a user would write (it refers to ``pipe``) and a ``run``
function that performs it. `apply_config` runs the steps; `emit_python` prints their code. Both come
from the same objects, so a generated script and ``advisor.load_pipeline`` cannot drift apart.

Order of the steps (and why):

1. ``torch._dynamo.config`` flags: dynamo reads them when it first traces, so they go before
   anything is compiled (``capture_dynamic_output_shape_ops`` for bitsandbytes, a larger
   ``cache_size_limit`` with offloading: the seed page sets them first);
2. layerwise casting (fp8 storage), then ``channels_last``: both rewrite the weights in place,
   before offloading hooks capture them;
3. device placement: ``pipe.to(device)``, model / sequential CPU offload or group offload;
4. VAE tiling / slicing (after group offload: diffusers warns about tiling set before streams);
5. the attention backend;
6. ``torch.compile`` last: compiling captures the module as it is then, hooks included.

Quantization is not a step: it happens while loading, through `pipeline_kwargs`.

>>> config = OptimizationConfig(device="cpu", compile=Compile(backend="eager"))  # doctest: +SKIP
>>> pipe = load_pipeline("black-forest-labs/FLUX.1-dev", config)  # doctest: +SKIP

torch, diffusers and torchao are imported inside the functions only.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from advisor.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from advisor.config import OptimizationConfig

__all__ = [
    "ConfigWarning",
    "Step",
    "apply_config",
    "check_config",
    "check_machine",
    "check_pipeline",
    "emit_python",
    "load_pipeline",
    "pipeline_kwargs",
    "plan",
    "quantization_code",
]


class ConfigWarning(UserWarning):
    """A config applies, but not quite as written (made for another pipeline or GPU, a skipped option)."""


# torchao scheme -> the AOBaseConfig class in torchao.quantization that implements it.
TORCHAO_SCHEMES = {
    "int8_weight_only": "Int8WeightOnlyConfig",
    "int8_dynamic": "Int8DynamicActivationInt8WeightConfig",
    "float8_weight_only": "Float8WeightOnlyConfig",
    "float8_dynamic": "Float8DynamicActivationFloat8WeightConfig",
    "int4_weight_only": "Int4WeightOnlyConfig",
}
# Schemes that torchao 0.18 cannot run on a CPU (checked on the tiny pipelines): fp8 dynamic
# asserts CUDA compute capability >= 8.9, int4 weight-only needs the CUDA-only `mslk` kernels.
_TORCHAO_CUDA_ONLY = {
    "float8_dynamic": "needs a CUDA GPU with compute capability >= 8.9",
    "int4_weight_only": "needs CUDA int4 kernels",
}
_NOT_MODELS = ("tokenizer", "scheduler", "feature_extractor", "processor", "image_processor")


# --- rendering Python source ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Expr:
    """A value together with the source that produces it, e.g. ``torch.bfloat16``."""

    code: str
    value: Any


def _dtype_expr(name: str) -> _Expr:
    import torch

    return _Expr(f"torch.{name}", getattr(torch, name))


def _py(value: Any) -> str:
    if isinstance(value, _Expr):
        return value.code
    if isinstance(value, str):
        return json.dumps(value)  # double quotes, like the diffusers docs
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py(k)}: {_py(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_py(v) for v in value) + "]"
    if isinstance(value, tuple):
        return "(" + ", ".join(_py(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value)  # bool, int, float, None


def _value(value: Any) -> Any:
    if isinstance(value, _Expr):
        return value.value
    if isinstance(value, dict):
        return {k: _value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_value(v) for v in value)
    return value


def _call_code(callee: str, args: Iterable[Any] = (), kwargs: dict[str, Any] | None = None) -> str:
    parts = [_py(a) for a in args] + [f"{k}={_py(v)}" for k, v in (kwargs or {}).items()]
    one_line = f"{callee}({', '.join(parts)})"
    if len(one_line) <= 120:
        return one_line
    return f"{callee}(\n" + "".join(f"    {part},\n" for part in parts) + ")"


# --- steps ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One post-load action: what it does, the code a user would write, and the function doing it."""

    key: str  # the config key it comes from: compile, layerwise_casting, offload, vae, ...
    description: str
    code: str
    run: Callable[[Any], None] = field(repr=False, compare=False)
    imports: tuple[str, ...] = ()

    def __call__(self, pipe: Any) -> None:
        self.run(pipe)


def _target(pipe: Any, component: str | None) -> Any:
    return pipe if component is None else getattr(pipe, component)


def _method_step(
    key: str,
    description: str,
    component: str | None,
    method: str,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    imports: tuple[str, ...] = (),
) -> Step:
    kwargs = dict(kwargs or {})
    obj = "pipe" if component is None else f"pipe.{component}"

    def run(pipe: Any) -> None:
        getattr(_target(pipe, component), method)(*[_value(a) for a in args], **_value(kwargs))

    return Step(key, description, _call_code(f"{obj}.{method}", args, kwargs), run, imports)


def _function_step(key: str, description: str, module: str, name: str, component: str, kwargs: dict[str, Any]) -> Step:
    kwargs = dict(kwargs)

    def run(pipe: Any) -> None:
        getattr(importlib.import_module(module), name)(getattr(pipe, component), **_value(kwargs))

    code = _call_code(name, [_Expr(f"pipe.{component}", None)], kwargs)
    return Step(key, description, code, run, (f"from {module} import {name}",))


def _dynamo_step(option: str, value: int | bool) -> Step:
    def run(pipe: Any) -> None:
        import torch._dynamo

        setattr(torch._dynamo.config, option, value)

    return Step("compile.dynamo_config", f"dynamo flag {option}", f"torch._dynamo.config.{option} = {value!r}", run)


# --- what a pipeline holds ------------------------------------------------------------------------


@dataclass
class _Layout:
    """The components of a pipeline (name -> class), from a loaded pipe, a model_index.json or nothing."""

    classes: dict[str, type | None] | None  # None: unknown (emitting for a model we cannot read)
    libraries: dict[str, str | None] = field(default_factory=dict)
    pipeline_class: str | None = None
    source: str = "unknown"

    @property
    def known(self) -> bool:
        return self.classes is not None

    def names(self) -> list[str]:
        return list(self.classes or {})

    def cls(self, name: str) -> type | None:
        return (self.classes or {}).get(name)

    def class_name(self, name: str) -> str:
        cls = self.cls(name)
        return cls.__name__ if cls is not None else name

    def is_module(self, name: str) -> bool:
        import torch

        cls = self.cls(name)
        if cls is not None:
            return issubclass(cls, torch.nn.Module)
        return not name.startswith(_NOT_MODELS)

    def is_diffusers_model(self, name: str) -> bool:
        cls = self.cls(name)
        if cls is not None:
            from diffusers import ModelMixin

            return issubclass(cls, ModelMixin)
        library = self.libraries.get(name)
        if library is not None:
            return library == "diffusers" and self.is_module(name)
        return not name.startswith(("text_encoder", "image_encoder", *_NOT_MODELS))

    def modules(self) -> list[str]:
        return [name for name in self.names() if self.is_module(name)]

    def denoisers(self) -> list[str]:
        if not self.known:
            return ["transformer"]
        found = []
        for name in self.modules():
            class_name = self.class_name(name)
            if name.startswith(("transformer", "unet", "prior")) or re.search(
                r"(Transformer\w*Model|UNet\w*Model)$", class_name
            ):
                if self.is_diffusers_model(name):
                    found.append(name)
        return found

    def has_attr(self, name: str, attr: str) -> bool:
        cls = self.cls(name)
        return True if cls is None else getattr(cls, attr, None) is not None


def _layout_of_pipe(pipe: Any) -> _Layout:
    classes = {name: type(obj) for name, obj in pipe.components.items() if obj is not None}
    libraries = {name: type(obj).__module__.split(".")[0] for name, obj in pipe.components.items() if obj is not None}
    return _Layout(classes, libraries, type(pipe).__name__, "pipeline")


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


def _model_index(model: str | Path) -> tuple[dict[str, Any], str] | None:
    """model_index.json of a local folder or a cached hub repo; never touches the network."""
    folder = Path(model)
    if (folder / "model_index.json").is_file():
        return json.loads((folder / "model_index.json").read_text()), "folder"
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(str(model), "model_index.json")
    except Exception:
        found = None
    if isinstance(found, str):
        return json.loads(Path(found).read_text()), "cache"
    return None


def _catalog_entry(model: str) -> dict[str, Any] | None:
    try:
        from advisor.probe.models import catalog_index

        path = catalog_index().get(str(model).lower())
        return json.loads(Path(path).read_text()) if path else None
    except Exception:
        return None


def _layout_of_model(model: str | Path | None) -> _Layout:
    """What `model` holds, without loading weights: local folder, HF cache, then the built-in catalog."""
    if model is None:
        return _Layout(None)
    found = _model_index(model)
    if found is not None:
        index, source = found
        classes: dict[str, type | None] = {}
        libraries: dict[str, str | None] = {}
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
                continue
            libraries[name] = entry[0]
            classes[name] = _resolve_class(entry[0], entry[1])
        return _Layout(classes, libraries, index.get("_class_name"), source)
    entry = _catalog_entry(str(model))
    if entry is not None:
        classes, libraries = {}, {}
        for item in entry.get("components", []):
            libraries[item["name"]] = item["library"]
            classes[item["name"]] = _resolve_class(item["library"], item["class_name"])
        for name, class_name in entry.get("other_components", {}).items():
            libraries[name] = None
            classes[name] = _resolve_class(None, class_name)
        return _Layout(classes, libraries, entry.get("pipeline_class"), "catalog")
    return _Layout(None)


# --- quantization at load time --------------------------------------------------------------------


@dataclass(frozen=True)
class _Quantization:
    imports: tuple[str, ...]
    code: str  # `pipeline_quant_config = PipelineQuantizationConfig(...)`
    build: Callable[[], Any]


def _quantization(config: OptimizationConfig, layout: _Layout) -> _Quantization | None:
    q = config.quantization
    if q is None:
        return None
    imports = ("from diffusers.quantizers import PipelineQuantizationConfig",)
    if q.backend in ("bitsandbytes_4bit", "bitsandbytes_8bit"):
        if q.backend == "bitsandbytes_4bit":
            quant_kwargs: dict[str, Any] = {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": q.quant_type or "nf4",
                "bnb_4bit_compute_dtype": _dtype_expr(config.dtype),
            }
            if q.double_quant:
                quant_kwargs["bnb_4bit_use_double_quant"] = True
        else:
            quant_kwargs = {"load_in_8bit": True}
        kwargs = {"quant_backend": q.backend, "quant_kwargs": quant_kwargs, "components_to_quantize": list(q.components)}

        def build() -> Any:
            from diffusers.quantizers import PipelineQuantizationConfig

            return PipelineQuantizationConfig(**_value(kwargs))

        return _Quantization(imports, "pipeline_quant_config = " + _call_code("PipelineQuantizationConfig", (), kwargs), build)

    # torchao: diffusers' and transformers' TorchAoConfig take different arguments, so diffusers
    # refuses `quant_backend="torchao"` ("signatures ... don't match"): each component gets the
    # config class of the library it belongs to, through `quant_mapping`.
    scheme_class = TORCHAO_SCHEMES[q.scheme or "int8_weight_only"]
    mapping = {name: layout.is_diffusers_model(name) for name in q.components}
    imports += (f"from torchao.quantization import {scheme_class}",)
    if any(mapping.values()):
        imports += ("from diffusers import TorchAoConfig",)
    if not all(mapping.values()):
        imports += ("from transformers import TorchAoConfig as TransformersTorchAoConfig",)
    lines = ["pipeline_quant_config = PipelineQuantizationConfig(", "    quant_mapping={"]
    for name, is_diffusers in mapping.items():
        callee = "TorchAoConfig" if is_diffusers else "TransformersTorchAoConfig"
        lines.append(f"        {_py(name)}: {callee}({scheme_class}()),")
    lines += ["    }", ")"]

    def build_torchao() -> Any:
        import diffusers
        import torchao.quantization
        import transformers
        from diffusers.quantizers import PipelineQuantizationConfig

        scheme = getattr(torchao.quantization, scheme_class)
        return PipelineQuantizationConfig(
            quant_mapping={
                name: (diffusers.TorchAoConfig if is_diffusers else transformers.TorchAoConfig)(scheme())
                for name, is_diffusers in mapping.items()
            }
        )

    return _Quantization(imports, "\n".join(lines), build_torchao)


def _dtype_keyword() -> str:
    """diffusers deprecated `torch_dtype` for `dtype` (and warns on every load); older ones only know the former."""
    try:
        from diffusers.utils import deprecation_utils

        return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"
    except ImportError:
        return "torch_dtype"


def pipeline_kwargs(config: OptimizationConfig, model: str | Path | None = None) -> dict[str, Any]:
    """What ``DiffusionPipeline.from_pretrained`` needs: the dtype and, if any, ``quantization_config``.

    The dtype keyword is ``dtype`` on diffusers versions that deprecate ``torch_dtype`` (0.42.1 warns
    on every load), else ``torch_dtype``. `model` (or ``config.provenance.model``) lets torchao pick
    diffusers' or transformers' ``TorchAoConfig`` per component from the model's ``model_index.json``;
    without it, ``text_encoder*`` / ``image_encoder*`` count as transformers models.
    """
    layout = _layout_for_loading(config, model)
    kwargs: dict[str, Any] = {_dtype_keyword(): _dtype_expr(config.dtype).value}
    quant = _quantization(config, layout)
    if quant is not None:
        kwargs["quantization_config"] = quant.build()
    return kwargs


def quantization_code(config: OptimizationConfig, model: str | Path | None = None) -> str | None:
    """The source that builds `pipeline_kwargs(config)["quantization_config"]`, or None."""
    quant = _quantization(config, _layout_for_loading(config, model))
    return None if quant is None else quant.code


def _layout_for_loading(config: OptimizationConfig, model: str | Path | None) -> _Layout:
    layout = _layout_of_model(model)
    if not layout.known and model is None and config.provenance.model:
        layout = _layout_of_model(config.provenance.model)
    return layout


# --- checks ---------------------------------------------------------------------------------------


def _compiled_with_hooks(config: OptimizationConfig) -> list[tuple[str, str]]:
    """(component, why) for compiled components whose diffusers hooks break a full graph."""
    compile_ = config.compile
    if compile_ is None or not compile_.fullgraph:
        return []
    found = []
    for name in compile_.components:
        offload = config.offload
        if offload.strategy == "group" and (offload.components is None or name in offload.components):
            found.append((name, "is group-offloaded"))
        elif config.layerwise_casting and name in config.layerwise_casting.components:
            found.append((name, "is layerwise-cast"))
    return found


def _torchao_group_offloaded(config: OptimizationConfig) -> list[str]:
    q, offload = config.quantization, config.offload
    if q is None or q.backend != "torchao" or offload.strategy != "group":
        return []
    return [name for name in q.components if offload.components is None or name in offload.components]


def check_config(config: OptimizationConfig) -> None:
    """Checks that need the installed libraries but neither a pipeline nor a GPU; raises ConfigError."""
    import torch
    import torch._dynamo

    offload = config.offload
    for name, why in _compiled_with_hooks(config):
        raise ConfigError(
            f"`compile.fullgraph: true` fails on `{name}`, which {why}: diffusers' hooks run outside "
            f"torch.compile and break the graph (torch {torch.__version__}); set `compile.fullgraph: false`"
        )
    for name in _torchao_group_offloaded(config):
        if offload.offload_to_disk_path:
            raise ConfigError(
                f"`offload.offload_to_disk_path` cannot hold `{name}`: safetensors cannot store torchao-quantized "
                f"tensors; remove `offload_to_disk_path` or leave `{name}` out of `offload.components`"
            )
        if (
            offload.offload_type == "block_level"
            and not offload.use_stream
            and config.compile is not None
            and name in config.compile.components
        ):
            raise ConfigError(
                f"torchao-quantized, compiled `{name}` cannot be group-offloaded with `offload.offload_type: block_level` "
                "(without streams diffusers moves the block with Module.to, which cannot swap torchao weights that "
                "torch.compile references); use `offload.offload_type: leaf_level`"
            )
    if config.compile is not None:
        for option in config.compile.dynamo_config:
            if not hasattr(torch._dynamo.config, option):
                raise ConfigError(f"`compile.dynamo_config.{option}`: torch._dynamo.config has no option {option!r}")
        backends = torch._dynamo.list_backends(exclude_tags=())
        if config.compile.backend not in backends:
            raise ConfigError(
                f"`compile.backend: {config.compile.backend}` is not a torch.compile backend here; "
                f"use one of {', '.join(sorted(backends))}"
            )
    if config.attention_backend is not None:
        from diffusers.models.attention_dispatch import AttentionBackendName

        names = sorted(member.value for member in AttentionBackendName)
        if config.attention_backend.lower() not in names:
            raise ConfigError(f"`attention_backend: {config.attention_backend}` is unknown; use one of {', '.join(names)}")


def _device(config: OptimizationConfig) -> Any:
    import torch

    try:
        return torch.device(config.device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"`device: {config.device}` is not a torch device; use e.g. `cuda`, `cuda:1` or `cpu`") from None


def check_machine(config: OptimizationConfig) -> None:
    """Refuse, before anything loads, what this machine cannot run; each message names the key and the way out."""
    import torch

    check_config(config)
    device = _device(config)
    cuda = torch.cuda.is_available()
    here = f"this machine has no CUDA GPU (torch {torch.__version__})"
    q = config.quantization
    if q is not None:
        needed = "torchao" if q.backend == "torchao" else "bitsandbytes"
        if importlib.util.find_spec(needed) is None:
            raise ConfigError(f"`quantization.backend: {q.backend}` needs `pip install {needed}`, which is not installed here")
    if q is not None and q.backend.startswith("bitsandbytes"):
        if not cuda:
            raise ConfigError(
                f"`quantization.backend: {q.backend}` needs CUDA and {here}; "
                "on CPU use `quantization.backend: torchao` or `layerwise_casting`"
            )
        if device.type != "cuda":
            raise ConfigError(f"`quantization.backend: {q.backend}` needs `device: cuda`, not `device: {config.device}`")
    offload = config.offload
    if offload.strategy in ("model", "sequential") and not cuda:
        raise ConfigError(
            f"`offload.strategy: {offload.strategy}` moves weights to a CUDA GPU and {here}; "
            "use `offload.strategy: group` or `none` with `device: cpu`"
        )
    if offload.use_stream and (not cuda or device.type != "cuda"):
        reason = here if not cuda else f"`device` is {config.device}"
        raise ConfigError(f"`offload.use_stream: true` needs CUDA streams and {reason}; set `offload.use_stream: false`")
    if q is not None and q.backend == "torchao":
        scheme = q.scheme or "int8_weight_only"
        if scheme in _TORCHAO_CUDA_ONLY and (not cuda or device.type != "cuda"):
            raise ConfigError(
                f"`quantization.scheme: {scheme}` {_TORCHAO_CUDA_ONLY[scheme]}; "
                "on CPU use int8_weight_only, int8_dynamic or float8_weight_only"
            )
        if scheme == "float8_dynamic" and cuda and device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            if (major, minor) < (8, 9):
                raise ConfigError(
                    f"`quantization.scheme: float8_dynamic` needs compute capability >= 8.9, this GPU has {major}.{minor}; "
                    "use int8_weight_only or int8_dynamic"
                )
    if device.type == "cuda":
        if not cuda:
            raise ConfigError(f"`device: {config.device}` but {here}; use `device: cpu`")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"`device: {config.device}` but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is None or not getattr(backend, "is_available", lambda: False)():
            raise ConfigError(f"`device: {config.device}` is not available on this machine; use `device: cpu`")
    if config.attention_backend is not None:
        try:
            from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

            _check_attention_backend_requirements(AttentionBackendName(config.attention_backend.lower()))
        except ImportError:
            pass
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"`attention_backend: {config.attention_backend}`: {exc}") from None


def _check_components(config: OptimizationConfig, layout: _Layout, what: str) -> None:
    if not layout.known:
        return
    models = layout.modules()
    for key, name in config.named_components():
        if name not in layout.names():
            raise ConfigError(
                f"`{key}` names {name!r}, which {what} does not have; its components are {', '.join(sorted(models))}"
            )
        if name not in models:
            raise ConfigError(
                f"`{key}` names {name!r}, a {layout.class_name(name)} rather than a model; "
                f"the models of {what} are {', '.join(sorted(models))}"
            )


def _gpu_warnings(config: OptimizationConfig, gpu_name: str, total_memory: int) -> None:
    p = config.provenance
    if p.budget_bytes is not None and p.budget_bytes > total_memory:
        warnings.warn(
            f"`provenance.budget_bytes` ({p.budget_bytes}) is more than this GPU's {total_memory} bytes ({gpu_name}); "
            "the config was made for a bigger GPU and may run out of memory here",
            ConfigWarning,
            stacklevel=3,
        )
    if p.gpu_name is not None and p.gpu_name != gpu_name:
        warnings.warn(
            f"`provenance.gpu_name` is {p.gpu_name!r} but this GPU is {gpu_name!r}; re-run `advisor tune` for this GPU",
            ConfigWarning,
            stacklevel=3,
        )


def check_pipeline(pipe: Any, config: OptimizationConfig) -> None:
    """Checks against a loaded pipeline: ConfigError for missing components, warnings for mismatches."""
    import torch

    layout = _layout_of_pipe(pipe)
    what = type(pipe).__name__
    _check_components(config, layout, f"this {what}")
    expected = config.provenance.pipeline_class
    if expected is not None and expected != what:
        warnings.warn(
            f"`provenance.pipeline_class` is {expected} but the pipeline is a {what}; the config was made for another model",
            ConfigWarning,
            stacklevel=3,
        )
    if config.channels_last:
        for name in layout.denoisers():
            if any(p.dim() == 5 for p in pipe.components[name].parameters()):
                raise ConfigError(
                    f"`channels_last: true` cannot apply to {name} ({layout.class_name(name)}): it has 5-D (Conv3d) "
                    "weights and channels_last is for 4-D ones; set `channels_last: false`"
                )
    if config.layerwise_casting is not None:
        for name in config.layerwise_casting.components:
            if layout.is_diffusers_model(name):
                continue
            first = _first_weight_cast(pipe.components[name], _casting_skips(layout.cls(name)))
            if first is not None:
                raise ConfigError(
                    f"`layerwise_casting.components` cannot include {name!r} ({layout.class_name(name)}): its first "
                    f"weight {first!r} would be stored in fp8, so {name}.dtype would read fp8 and the pipeline would "
                    f"cast prompt embeddings to it; remove {name!r}"
                )
    if config.quantization is not None:
        plain = [name for name in config.quantization.components if getattr(pipe.components[name], "hf_quantizer", None) is None]
        if plain:
            warnings.warn(
                f"`quantization.components` {plain} are not quantized in this pipeline: load it with "
                "`**config.pipeline_kwargs()` or `advisor.load_pipeline`",
                ConfigWarning,
                stacklevel=3,
            )
    device = _device(config)
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        _gpu_warnings(config, props.name, props.total_memory)


# --- the plan -------------------------------------------------------------------------------------


def _casting_skips(cls: type | None) -> tuple[str, ...]:
    """Modules a text encoder keeps at the compute dtype under layerwise casting: diffusers' defaults,
    the embeddings (see `advisor.probe.models.ENCODER_CASTING_SKIP_PATTERNS`) and its own fp32 modules."""
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    from advisor.probe.models import ENCODER_CASTING_SKIP_PATTERNS

    own = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ()) if cls is not None else ()
    return tuple(dict.fromkeys((*DEFAULT_SKIP_MODULES_PATTERN, *ENCODER_CASTING_SKIP_PATTERNS, *own)))


def _first_weight_cast(module: Any, patterns: tuple[str, ...]) -> str | None:
    """The name of `module`'s first floating-point weight if layerwise casting with `patterns` would cast it."""
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS

    modules = dict(module.named_modules())
    for name, param in module.named_parameters():
        if not param.is_floating_point():
            continue
        owner = name.rpartition(".")[0]
        parts = owner.split(".") if owner else []
        skipped = any(re.search(p, ".".join(parts[: i + 1])) for p in patterns for i in range(len(parts)))
        if skipped or not isinstance(modules[owner], _GO_LC_SUPPORTED_PYTORCH_LAYERS):
            return None
        return name
    return None


def _placement_steps(config: OptimizationConfig, layout: _Layout) -> list[Step]:
    device = config.device
    offload = config.offload
    if offload.strategy == "none":
        return [_method_step("offload", f"move the pipeline to {device}", None, "to", (device,))]
    if offload.strategy in ("model", "sequential"):
        method = "enable_model_cpu_offload" if offload.strategy == "model" else "enable_sequential_cpu_offload"
        kwargs = {} if device == "cuda" else {"device": device}
        what = "whole models" if offload.strategy == "model" else "every layer"
        return [_method_step("offload", f"{offload.strategy} CPU offload: {what} move to {device} when used", None, method, (), kwargs)]

    kwargs: dict[str, Any] = {"onload_device": device, "offload_device": "cpu", "offload_type": offload.offload_type}
    if offload.offload_type == "block_level":
        kwargs["num_blocks_per_group"] = offload.num_blocks_per_group
    for flag in ("use_stream", "record_stream", "non_blocking", "low_cpu_mem_usage"):
        if getattr(offload, flag):
            kwargs[flag] = True
    if offload.offload_to_disk_path:
        kwargs["offload_to_disk_path"] = offload.offload_to_disk_path
    what = offload.label()
    if offload.components is None:
        return [_method_step("offload", f"{what} of every model", None, "enable_group_offload", (), kwargs)]

    steps = []
    for name in offload.components:
        description = f"{what} of {name}"
        if layout.is_diffusers_model(name):
            steps.append(_method_step("offload", description, name, "enable_group_offload", (), kwargs))
        else:
            steps.append(_function_step("offload", description, "diffusers.hooks", "apply_group_offloading", name, kwargs))
    if layout.known:
        for name in layout.modules():
            if name not in offload.components:
                steps.append(_method_step("offload", f"keep {name} on {device}", name, "to", (device,)))
    else:
        keep = list(offload.components)

        def run(pipe: Any) -> None:
            import torch

            for name, component in pipe.components.items():
                if name not in keep and isinstance(component, torch.nn.Module):
                    component.to(device)

        code = (
            "for name, component in pipe.components.items():\n"
            f"    if name not in {_py(keep)} and isinstance(component, torch.nn.Module):\n"
            f"        component.to({_py(device)})"
        )
        steps.append(Step("offload", f"keep the other models on {device}", code, run))
    return steps


def _compile_steps(config: OptimizationConfig, layout: _Layout) -> list[Step]:
    c = config.compile
    if c is None:
        return []
    kwargs: dict[str, Any] = {}
    if c.mode is not None:
        kwargs["mode"] = c.mode
    kwargs["fullgraph"] = c.fullgraph
    if c.dynamic is not None:
        kwargs["dynamic"] = c.dynamic
    if c.backend != "inductor":
        kwargs["backend"] = c.backend
    steps = []
    for name in c.components:
        regional = c.regional and layout.is_diffusers_model(name) and layout.has_attr(name, "_repeated_blocks")
        if c.regional and not regional:
            warnings.warn(
                f"`compile.regional: true` but {name} ({layout.class_name(name)}) has no `_repeated_blocks`; "
                "compiling the whole model instead",
                ConfigWarning,
                stacklevel=4,
            )
        if regional:
            steps.append(
                _method_step("compile", f"compile the repeated blocks of {name} (regional)", name, "compile_repeated_blocks", (), kwargs)
            )
        else:
            steps.append(_method_step("compile", f"compile {name}", name, "compile", (), kwargs))
    return steps


def _plan(config: OptimizationConfig, layout: _Layout) -> list[Step]:
    steps: list[Step] = []
    if config.compile is not None:
        steps += [_dynamo_step(option, value) for option, value in config.compile.dynamo_config.items()]

    if config.layerwise_casting is not None:
        storage = config.layerwise_casting.storage_dtype
        kwargs = {"storage_dtype": _dtype_expr(storage), "compute_dtype": _dtype_expr(config.dtype)}
        for name in config.layerwise_casting.components:
            description = f"store {name} weights in {storage}, compute in {config.dtype}"
            if layout.is_diffusers_model(name):
                steps.append(_method_step("layerwise_casting", description, name, "enable_layerwise_casting", (), kwargs))
            else:
                skip = {**kwargs, "skip_modules_pattern": _casting_skips(layout.cls(name))}
                steps.append(
                    _function_step("layerwise_casting", description, "diffusers.hooks", "apply_layerwise_casting", name, skip)
                )

    if config.channels_last:
        for name in layout.denoisers():
            steps.append(
                _method_step(
                    "channels_last", f"channels_last memory format for {name}", name, "to", (),
                    {"memory_format": _Expr("torch.channels_last", _channels_last())},
                )
            )  # fmt: skip

    steps += _placement_steps(config, layout)

    for flag, method in (("tiling", "enable_tiling"), ("slicing", "enable_slicing")):
        if not getattr(config.vae, flag):
            continue
        if layout.known and "vae" not in layout.names():
            warnings.warn(f"`vae.{flag}: true` but the pipeline has no `vae`; skipped", ConfigWarning, stacklevel=3)
        elif not layout.has_attr("vae", method):
            warnings.warn(
                f"`vae.{flag}: true` but {layout.class_name('vae')} has no {method}(); skipped", ConfigWarning, stacklevel=3
            )
        else:
            steps.append(_method_step("vae", f"VAE {flag}", "vae", method))

    if config.attention_backend is not None:
        for name in layout.denoisers():
            steps.append(
                _method_step(
                    "attention_backend", f"{config.attention_backend} attention in {name}", name, "set_attention_backend",
                    (config.attention_backend,),
                )
            )  # fmt: skip

    steps += _compile_steps(config, layout)
    return steps


def _channels_last() -> Any:
    import torch

    return torch.channels_last


def plan(config: OptimizationConfig, pipe: Any = None, *, model: str | Path | None = None) -> list[Step]:
    """The post-load steps for `config`, in the order they must run.

    Component classes come from `pipe` when given (what `apply_config` does), else from `model`'s
    ``model_index.json`` (local folder, HF cache or the built-in catalog); with neither, names are
    taken as written and ``transformer`` is the denoiser.
    """
    layout = _layout_of_pipe(pipe) if pipe is not None else _layout_of_model(model)
    return _plan(config, layout)


def apply_config(pipe: Any, config: OptimizationConfig) -> Any:
    """Check `config` against this machine and `pipe`, then run its steps on `pipe`; returns `pipe`."""
    check_machine(config)
    check_pipeline(pipe, config)
    for step in plan(config, pipe):
        step.run(pipe)
    return pipe


def load_pipeline(model: str | Path, config: OptimizationConfig | str | Path, **from_pretrained_kwargs: Any) -> Any:
    """Load `model` the way `config` says and apply it: ``advisor.load_pipeline(model, advisor.load_config(path))``.

    `config` may also be the path of a config file. Extra keyword arguments go to
    ``DiffusionPipeline.from_pretrained`` (e.g. ``revision``, ``variant``, ``local_files_only``).
    """
    from advisor.config import OptimizationConfig, load_config

    if not isinstance(config, OptimizationConfig):
        config = load_config(config)
    for key in ("dtype", "torch_dtype", "quantization_config"):
        if key in from_pretrained_kwargs:
            raise UsageError(f"load_pipeline: `{key}` comes from the config; change the config instead of passing it")
    check_machine(config)
    layout = _layout_of_model(model)
    _check_components(config, layout, str(model))
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, **pipeline_kwargs(config, model), **from_pretrained_kwargs)
    return apply_config(pipe, config)


# --- the script -----------------------------------------------------------------------------------


def _workload(config: OptimizationConfig, layout: _Layout) -> str:
    workload = config.provenance.workload or {}
    for key in ("kind", "workload", "type"):
        if workload.get(key) in ("image", "video", "audio"):
            return workload[key]
    pipeline_class = layout.pipeline_class or config.provenance.pipeline_class
    if pipeline_class:
        try:
            from advisor.probe.models import classify_workload

            return classify_workload(pipeline_class)[0]
        except Exception:
            pass
    return "image"


def emit_python(model: str, config: OptimizationConfig) -> str:
    """A runnable script, in the style of the diffusers docs, that does what ``load_pipeline(model, config)`` does.

    Generated from the same `Step` objects that `apply_config` runs. Machine checks are left to the
    machine that runs it; config problems (unknown components, impossible combinations) raise here.
    """
    from advisor import __version__

    check_config(config)
    layout = _layout_of_model(model)
    _check_components(config, layout, str(model))
    quant = _quantization(config, layout)
    steps = _plan(config, layout)

    imports = ["import torch", "from diffusers import DiffusionPipeline"]
    for line in (quant.imports if quant else ()) + tuple(i for s in steps for i in s.imports):
        if line not in imports:
            imports.append(line)
    imports = imports[:1] + sorted(imports[1:])

    load_kwargs = {}
    if quant is not None:
        load_kwargs["quantization_config"] = _Expr("pipeline_quant_config", None)
    load_kwargs[_dtype_keyword()] = _dtype_expr(config.dtype)

    flags = [step for step in steps if step.key == "compile.dynamo_config"]  # first, as on the seed page
    lines = [
        f"# {config.summary()}",
        f"# Generated by advisor {__version__}: the same steps as advisor.load_pipeline({_py(str(model))}, config).",
        *imports,
        "",
    ]
    lines += [step.code for step in flags] + ([""] if flags else [])
    if quant is not None:
        lines += [quant.code]
    lines += ["pipe = " + _call_code("DiffusionPipeline.from_pretrained", (str(model),), load_kwargs), ""]
    for step in steps:
        if step.key != "compile.dynamo_config":
            lines += [f"# {step.description}", step.code]
    kind = _workload(config, layout)
    call = _call_code("pipe", ("a prompt",), _call_kwargs(config, kind))
    output = {"video": "video = {}.frames[0]", "audio": "audio = {}.audios[0]"}.get(kind, "image = {}.images[0]")
    lines += ["", output.format(call)]
    return "\n".join(lines) + "\n"


def _call_kwargs(config: OptimizationConfig, kind: str) -> dict[str, Any]:
    """The size the config was made for (``provenance.workload``), as pipeline call arguments."""
    workload = config.provenance.workload or {}
    names = {"height": "height", "width": "width", "steps": "num_inference_steps"}
    if kind == "video":
        names["frames"] = "num_frames"
    return {arg: workload[key] for key, arg in names.items() if isinstance(workload.get(key), int)}
