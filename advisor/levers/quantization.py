"""The quantization lever: weights converted while they load (config section ``quantization``), one module per backend.

diffusers quantizes at load time through ``PipelineQuantizationConfig`` (its quantization
overview): the weights of the named components' linear layers become 4-bit, 8-bit or fp8 as they
load. What differs per backend lives in the backend's module, behind `QuantBackend`: its names,
the search space's choices, the bytes per weight, the speed and quality, where loading puts the
weights, its constraints and the loading code (`advisor.levers.bitsandbytes`,
`advisor.levers.torchao`, `advisor.levers.gguf`). This module is the family: it asks the backend a config names
(`backend_of`), and answers the rest of the advisor with questions that name none.

A new backend (quanto, SDNQ, another pre-quantized format) is one module with a `QuantBackend`
subclass, its values in the config schema and a line in `advisor.levers`.

It is one of the storage choices of the search space, beside layerwise casting (`advisor.plan.space`).
Pure Python at import: torch, diffusers and the backends' packages only inside `load`'s ``build``.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable

from advisor.config import OptimizationConfig, Quantization
from advisor.errors import ConfigError
from advisor.levers.base import Lever, Loading, Pick
from advisor.levers.code import source
from advisor.platform import Constraint, Platform, constraint
from advisor.units import format_size


OVERVIEW = "https://huggingface.co/docs/diffusers/main/en/quantization/overview"
# peft's LoRA layers over quantized ones, and their merge (installed peft 0.22: tuners/lora/bnb.py, torchao.py).
PEFT_QUANTIZED_LORA = "https://huggingface.co/docs/peft/developer_guides/quantization"


# The keyword and the script's variable of load-time quantization (diffusers' quantization overview).
KEYWORD, VARIABLE = "quantization_config", "pipeline_quant_config"


class QuantBackend:
    """One quantization backend: everything the advisor knows about it. Subclass it in its own module."""

    backends: tuple[str, ...]  # the ``quantization.backend`` values it serves
    package: str  # the pip package it needs
    # Every name of its choices as the config spells them (backends, schemes, kinds): named only in
    # its module and the config schema (`tests/test_ownership.py`).
    names: frozenset[str] = frozenset()
    constraints: tuple[Constraint, ...] = ()
    loads_onto_device: bool = False  # quantizes straight onto the GPU while loading (no copy in RAM)
    materialises_at_compute_dtype: bool = False  # builds a shard at the compute dtype before converting it
    converts_fp32_modules: bool = False  # also converts a transformers model's `_keep_in_fp32_modules`
    needs_dynamic_output_shapes: bool = False  # compiles only with capture_dynamic_output_shape_ops
    reads_into_ram: bool = False  # loading copies the whole checkpoint into RAM first, wherever it goes
    # built from its own file and handed to from_pretrained, which places (device_map) only what it loads
    built_apart: bool = False

    def choices(self, components: list[str], model: str | None = None) -> list[Quantization]:
        """What the search space offers for `components` of `model` (a Hub id: a pre-quantized
        checkpoint exists for some models only)."""
        return []

    def left_on_device_by_group_offload(self, quantization: Quantization, k: dict[str, Any]) -> tuple[float, float]:
        """(bytes per converted weight, bytes per output row) that group offloading leaves on the GPU:
        its hooks swap each parameter's ``data`` (diffusers/hooks/group_offloading.py), not what a
        quantized layer keeps beside it."""
        return 0.0, 0.0

    def scales_move_with_module(self, quantization: Quantization) -> bool:
        """Whether a model's ``.to(device)`` carries its quantized layers' scales along with their weights."""
        return True

    def download_note(self, quantization: Quantization, weight_bytes: int) -> str | None:
        """What the user must download for it (a pre-quantized checkpoint), if anything."""
        return None

    def needs_download(self, quantization: Quantization) -> bool:
        """Whether loading it would first download a checkpoint that is neither local nor cached."""
        return False

    def linear_bytes(self, quantization: Quantization, k: dict[str, Any]) -> tuple[float, float]:
        """(bytes per converted weight, bytes per output row of scales) of a linear layer."""
        raise NotImplementedError

    def stored_bytes(self, quantization: Quantization, component: Any, compute_bytes: int) -> float | None:
        """The component's bytes once loaded, where the backend knows them exactly (a checkpoint's
        header); None: from `linear_bytes`."""
        return None

    def speed_key(self, quantization: Quantization) -> str:
        """Its key in the estimate's ``quantization_speed`` table (``advisor/data/estimate_constants.json``)."""
        raise NotImplementedError

    def dequantises_per_layer(self, quantization: Quantization, compiled: bool) -> bool:
        """Whether its kernels expand a layer's weight to the compute dtype before the matmul."""
        return True

    def quantizes_activations(self, quantization: Quantization) -> bool:
        """Whether activations are quantized too (dynamic schemes: worth it only compiled)."""
        return False

    def eager_note(self, quantization: Quantization) -> str | None:
        """What the estimate says about running it without torch.compile, if anything."""
        return None

    def quality_cost(self, quantization: Quantization) -> tuple[str, str]:
        """(expected quality cost, source)."""
        raise NotImplementedError

    def lora_adapter_bytes(self, quantization: Quantization, compute_bytes: int) -> int:
        """Bytes per parameter of a LoRA adapter on layers it stores: peft gives a new adapter its base
        layer's dtype where that is a float, else the layer's ``compute_dtype`` (``peft/tuners/
        tuners_utils.py``); both are the compute dtype here by default."""
        return compute_bytes

    def lora_problem(self, quantization: Quantization, fuse: bool) -> tuple[str, str] | None:
        """(why a LoRA can't run on weights it stores, source), or None: its LoRA layers load and run
        unfused (peft wraps each quantized Linear). Fusing merges the adapter into weights it would
        have to quantize again: the LoRA's change, small beside the weights, is rounded to their grid
        (peft warns "may get different generations due to rounding errors" for bitsandbytes,
        ``peft/tuners/lora/bnb.py``; torchao re-quantizes, ``peft/tuners/lora/torchao.py``)."""
        if fuse:
            return (
                "fusing a LoRA into quantized weights rounds its change to their grid, losing part of it; "
                "it runs unfused on them",
                PEFT_QUANTIZED_LORA,
            )
        return None

    def probe_rows(
        self, packages: dict[str, str | None]
    ) -> dict[str, tuple[Callable[[str], OptimizationConfig], str]]:
        """The probe's backend table: row -> (an example config on a device, what makes it usable)."""
        return {}

    def load(self, config: OptimizationConfig, components: Any) -> Loading:
        """The ``quantization_config`` loading takes (`components`: `advisor.run.classes.Components`):
        code that assigns `VARIABLE`, and the object it builds."""
        raise NotImplementedError


BACKENDS: list[QuantBackend] = []


def add_backend(backend: QuantBackend) -> QuantBackend:
    BACKENDS.append(backend)
    return backend


def backend_of(quantization: Quantization) -> QuantBackend:
    return next(b for b in BACKENDS if quantization.backend in b.backends)


def import_backend(module: str, backend: str, package: str, extra: str) -> Any:
    """`module` of a backend's package, imported when a config that names it loads; or a one-line
    `ConfigError` saying how to install it."""
    try:
        importlib.import_module(module.partition(".")[0])  # as `import a.b` does: the package first
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"`quantization.backend: {backend}` needs the {package} package, which is not installed here: "
            f"pip install {package} (or the advisor's extra: pip install 'diffusers-advisor[{extra}]')"
        ) from None


def per_library_loading(
    components: Any,
    names: list[str],
    code: tuple[str, str],
    imports: tuple[str, str],
    make: Callable[[bool], Any],
    extra_imports: tuple[str, ...] = (),
) -> Loading:
    """``PipelineQuantizationConfig(quant_mapping=...)`` giving each of `names` its own library's
    config: diffusers' and transformers' classes of one backend take different arguments, so diffusers
    refuses ``quant_backend=...`` for them ("signatures ... don't match"). `code` and `imports` are the
    (diffusers, transformers) source of a config and its import; `make(is_diffusers)` builds one."""
    mapping = {name: components.is_diffusers_model(name) for name in names}
    needed = tuple(line for library, line in zip((True, False), imports) if library in mapping.values())
    lines = [f"{VARIABLE} = PipelineQuantizationConfig(", "    quant_mapping={"]
    lines += [
        f"        {source(name)}: {code[0] if is_diffusers else code[1]}," for name, is_diffusers in mapping.items()
    ]
    lines += ["    }", ")"]

    def build() -> Any:
        from diffusers.quantizers import PipelineQuantizationConfig

        return PipelineQuantizationConfig(quant_mapping={name: make(d) for name, d in mapping.items()})

    imported = ("from diffusers.quantizers import PipelineQuantizationConfig", *extra_imports, *needed)
    return Loading(KEYWORD, VARIABLE, imported, "\n".join(lines), build)


def transformer_example(backend: str, device: str | None = None, **fields: Any) -> Callable[[str], OptimizationConfig]:
    """The probe table's example of a backend: the transformer quantized, on the device asked for
    (or always `device`, for a backend that runs on one only)."""

    def example(asked: str) -> OptimizationConfig:
        q = Quantization(backend=backend, components=["transformer"], **fields)
        return OptimizationConfig(device=device or asked, quantization=q)

    return example


def quantized(config: OptimizationConfig, name: str) -> Quantization | None:
    """The quantization of component `name`, or None."""
    q = config.quantization
    return q if q is not None and name in q.components else None


def loaded_onto_device(config: OptimizationConfig) -> set[str]:
    """The components quantized straight onto the GPU while loading."""
    q = config.quantization
    return set(q.components) if q is not None and backend_of(q).loads_onto_device else set()


def _converted(backend: QuantBackend, component: Any) -> tuple[int, int]:
    """(weights, output rows) of `component`'s layers that `backend` converts."""
    linear, rows = component.linear_parameters, component.linear_rows
    if backend.converts_fp32_modules:
        linear += component.fp32_linear_parameters
        rows += component.fp32_linear_rows
    return linear, rows


def left_on_device_by_group_offload(config: OptimizationConfig, component: Any, k: dict[str, Any]) -> int:
    """Bytes of a quantized `component` that group offloading never moves off the GPU
    (`QuantBackend.left_on_device_by_group_offload`)."""
    quantization = quantized(config, component.name)
    if quantization is None:
        return 0
    backend = backend_of(quantization)
    linear, rows = _converted(backend, component)
    per_weight, per_row = backend.left_on_device_by_group_offload(quantization, k)
    return math.ceil(linear * per_weight + rows * per_row)


def movable_after_loading(config: OptimizationConfig) -> set[str]:
    """Of the components quantized straight onto the GPU while loading, those that may load onto the
    host instead and be moved there whole later, their scales with them (`QuantBackend.scales_move_with_module`)."""
    q = config.quantization
    return loaded_onto_device(config) if q is not None and backend_of(q).scales_move_with_module(q) else set()


def read_into_ram(config: OptimizationConfig) -> set[str]:
    """The components whose loading copies their whole checkpoint into RAM, wherever they go after."""
    q = config.quantization
    return set(q.components) if q is not None and backend_of(q).reads_into_ram else set()


def built_apart(config: OptimizationConfig) -> set[str]:
    """The components built from their own checkpoint and handed to ``from_pretrained`` as objects."""
    q = config.quantization
    return set(q.components) if q is not None and backend_of(q).built_apart else set()


def materialised_at_compute_dtype(config: OptimizationConfig) -> set[str]:
    """The components built at the compute dtype, shard by shard, before they are converted."""
    q = config.quantization
    return set(q.components) if q is not None and backend_of(q).materialises_at_compute_dtype else set()


def needs_dynamic_output_shapes(config: OptimizationConfig) -> bool:
    return config.quantization is not None and backend_of(config.quantization).needs_dynamic_output_shapes


def packages() -> tuple[str, ...]:
    """The backends' packages, in their order."""
    return tuple(dict.fromkeys(b.package for b in BACKENDS))


# --- constraints ---------------------------------------------------------------------------------

_INSTALLED: list[Constraint] = []


@constraint(
    "quantization-backend-installed",
    "quantization.backend",
    "a quantization backend needs its package: bitsandbytes, gguf, optimum-quanto, sdnq or torchao "
    "(pip install 'diffusers-advisor[torchao]', '[quanto]' or '[sdnq]')",
    OVERVIEW,
    into=_INSTALLED,
)
def quantization_backend_installed(config: OptimizationConfig, platform: Platform) -> str | None:
    q = config.quantization
    if q is None:
        return None
    package = backend_of(q).package
    if platform.missing(package):
        return f"`quantization.backend: {q.backend}` needs `pip install {package}`, which is not installed here"
    return None


# --- the lever -----------------------------------------------------------------------------------


class Quantizing(Lever):
    """Load-time quantization of the named components, by the backend the config names."""

    name = key = "quantization"
    order = -10  # at loading, before every post-load step
    # Not one of the optional dimensions: a storage choice of the space, beside layerwise casting.
    searched = False

    @property
    def constraints(self) -> tuple[Constraint, ...]:  # type: ignore[override]
        # Each backend's own limits first: installing a package fixes none of them.
        return (*(c for b in BACKENDS for c in b.constraints), *_INSTALLED)

    def choices_for(self, components: list[str], model: str | None = None) -> list[Quantization]:
        return [q for b in BACKENDS for q in b.choices(components, model)]

    def lossy(self, config: OptimizationConfig) -> bool:
        return config.quantization is not None

    def needs_download(self, quantization: Quantization) -> bool:
        return backend_of(quantization).needs_download(quantization)

    def quality_cost(self, config: OptimizationConfig) -> tuple[str, str] | None:
        q = config.quantization
        return None if q is None else backend_of(q).quality_cost(q)

    def stored_bytes(self, config: OptimizationConfig, component: Any, compute_bytes: int, k: dict) -> float | None:
        quantization = quantized(config, component.name)
        if quantization is None:
            return None
        backend = backend_of(quantization)
        exact = backend.stored_bytes(quantization, component, compute_bytes)
        if exact is not None:
            return exact
        linear, rows = _converted(backend, component)
        per_weight, per_row = backend.linear_bytes(quantization, k)
        return linear * per_weight + rows * per_row + (component.parameters - linear) * compute_bytes

    def memory_reasons(self, pick: Pick) -> list[str]:
        q = pick.config.quantization
        if q is None:
            return []
        download = backend_of(q).download_note(q, sum(pick.estimate.weight_bytes[name] for name in q.components))
        return [storage_reason(pick, q.label(), self), *([download] if download else []), *_other_backends(pick)]

    def loading(self, config: OptimizationConfig, components: Any) -> Loading | None:
        q = config.quantization
        return None if q is None else backend_of(q).load(config, components)


def _other_backends(pick: Pick) -> list[str]:
    """The best candidate of each other backend that fits, against the pick: one line, or none."""
    mine = backend_of(pick.config.quantization)
    best = []
    for backend in BACKENDS:
        if backend is not mine:
            rival = pick.rival(lambda c, b=backend: c.quantization is not None and backend_of(c.quantization) is b)
            if rival is not None:
                best.append(
                    f"{rival.config.quantization.label()} with {rival.config.offload.label()} {rival.score_s:.1f}s"
                )
    if not best:
        return []
    return [f"the other quantization backends' best that fit, against {pick.score_s:.1f}s: " + "; ".join(best)]


def storage_reason(pick: Pick, what: str, lever: Lever) -> str:
    """The line a storage lever (quantization, fp8 storage) explains a pick with: the weights it saves, at what cost."""
    plain = pick.predict(lever.off(pick.config))
    cost, source = lever.quality_cost(pick.config)  # a storage lever that is on is lossy
    return (
        f"quantized {what}: weights {format_size(sum(pick.estimate.weight_bytes.values()))} instead of "
        f"{format_size(sum(plain.weight_bytes.values()))}; expected quality cost: {cost} ({source}); "
        "the VAE is never quantized"
    )


QUANTIZATION = Quantizing()
