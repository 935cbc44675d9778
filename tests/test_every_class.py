"""Issue 13: every config `recommend` can emit, for every catalog pipeline class, must apply.

For each catalog model a tiny random-weight pipeline of the same class, component names and
component classes is built once (`advisor.testing.build_tiny_for`). Then every config the rule
engine emits for that model over a spread of targets passes the checks, names components the
pipeline has, and is applied to the loaded tiny pipeline (which then runs) after the GPU-only
parts are mapped to their nearest CPU equivalents (`cpu_equivalent`, which says what it changed).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import warnings

import numpy as np
import pytest


os.environ["HF_HUB_OFFLINE"] = "1"

from advisor.config import Offload, OptimizationConfig, Provenance, Quantization, config_from_dict  # noqa: E402
from advisor.levers.attention import BACKENDS  # noqa: E402
from advisor.probe.layout import catalog_entry, catalog_names  # noqa: E402


GIB = 2**30
MODELS = catalog_names()
# --gpu NAME or --vram SIZE, each planned with the default budget and with --budget 6GB.
TARGETS = [
    {"gpu": "RTX 4090"},
    {"gpu": "RTX 3060"},
    {"gpu": "H100"},
    {"gpu": "T4"},
    {"vram": 8 * GIB},
    {"vram": 24 * GIB},
]
BUDGETS = [None, 6 * GIB]

# diffusers 0.42 gives SD3Transformer2DModel and CogVideoXTransformer3DModel `_repeated_blocks = []`,
# and compile_repeated_blocks raises this for them; `Components.has_attr` (advisor/run/classes.py)
# takes the empty list for present, so `compile.regional: true` plans compile_repeated_blocks.
EMPTY_REPEATED_BLOCKS_CLASSES = {"SD3Transformer2DModel", "CogVideoXTransformer3DModel"}


def _model_id(model: str) -> str:
    return model.split("/")[-1]


def _builder_id(model: str) -> str:
    """The tiny builder a catalog model gets: its pipeline class, and the component marking a variant."""
    from advisor.testing import TINY_BUILDERS, variant_settings

    entry = catalog_entry(model)
    names = {item["name"] for item in entry["components"]} | variant_settings(entry)
    key = next(
        (k for k in TINY_BUILDERS if k[0] == entry["pipeline_class"] and k[1] in names),
        (entry["pipeline_class"], None),
    )
    return "-".join(filter(None, key))


# One tiny pipeline per builder -> the catalog models it stands for (FLUX.1-dev and -schnell share one).
GROUPS: dict[str, list[str]] = {}
for _model in MODELS:
    GROUPS.setdefault(_builder_id(_model), []).append(_model)


@functools.lru_cache(maxsize=None)
def decision_suite_configs(model_id: str) -> list[OptimizationConfig]:
    """The picks and alternatives of tests/test_decisions.py's scenarios for this model."""
    import test_decisions

    found = []
    for decision in test_decisions.DECISIONS:
        if load_catalog_id(decision.model) == model_id:
            result = test_decisions.decide(decision)
            found += [s.config for s in (result.best, *result.alternatives) if s is not None]
    return found


def load_catalog_id(name: str) -> str:
    from advisor.probe.models import profile_from_catalog

    return profile_from_catalog(name).model_id


def emitted_configs(model: str) -> tuple[OptimizationConfig, ...]:
    """Every distinct config (best and alternatives, provenance aside) recommend gives for `model` over TARGETS x BUDGETS."""
    from advisor.plan.recommend import recommend
    from advisor.plan.scenario import make_scenario
    from advisor.probe.models import profile_from_catalog
    from advisor.probe.target import planned_target
    from advisor.probe.workload import make_workload

    # The catalog profile, not load_profile: a Hugging Face cache on the machine must not change the test.
    profile = profile_from_catalog(model)
    found: dict[str, OptimizationConfig] = {}
    for target in TARGETS:
        for budget in BUDGETS:
            scenario = make_scenario(
                profile,
                make_workload(profile),
                planned_target(machine=None, ram=64 * GIB, **target),
                budget_bytes=budget,
            )
            result = recommend(scenario)
            for scored in (result.best, *result.alternatives):
                if scored is not None:
                    found.setdefault(scored.config.replace(provenance=Provenance()).key, scored.config)
    for config in decision_suite_configs(profile.model_id):
        found.setdefault(config.replace(provenance=Provenance()).key, config)
    assert found, f"recommend emitted no config for {model} on any target"
    return tuple(found.values())


def cpu_equivalent(config: OptimizationConfig, disk: str) -> tuple[OptimizationConfig, list[str]]:
    """The config with its GPU-only parts replaced by what runs on a CPU, and a note for each change."""
    notes: list[str] = []
    update: dict = {"device": "cpu"}
    q = config.quantization
    if q is not None and (q.backend.startswith("bitsandbytes") or q.kind in ("float8_dynamic", "int4_weight_only")):
        # bitsandbytes and fp8/int4 matmuls need CUDA: torchao int8 weight-only still quantizes the
        # same components at load time, through the same PipelineQuantizationConfig path.
        update["quantization"] = Quantization(backend="torchao", scheme="int8_weight_only", components=q.components)
        notes.append(f"quantization {q.backend}/{q.kind} -> torchao int8_weight_only")
    if config.expandable_segments:
        update["expandable_segments"] = False
        notes.append("expandable segments -> off (a setting of CUDA's caching allocator)")
    for key in ("context_parallel", "replicas"):
        if getattr(config, key) is not None:
            # one process per GPU under torchrun: tests/test_multi_gpu.py runs a split over two gloo processes
            update[key] = None
            notes.append(f"{key} -> one process (it takes one per GPU)")
    offload = config.offload
    if offload.device_map:
        offload = offload.replace(device_map=None)
        update["offload"] = offload
        notes.append("components over the GPUs -> one device (the CPU is one)")
    if offload.strategy in ("model", "sequential"):
        update["offload"] = Offload()
        notes.append(f"offload {offload.strategy} -> none (it moves weights to a CUDA GPU)")
    elif offload.strategy == "group":
        changes: dict = {"use_stream": False, "record_stream": False}
        if offload.resident_blocks:
            # Counts fitted to the full model's blocks; a tiny pipeline has a handful (partial offload
            # itself is applied for real in tests/test_partial_offload.py).
            changes["resident_blocks"] = None
            notes.append("partial offload -> group offload of every block (the tiny pipeline has other block counts)")
        quantized = update.get("quantization", q)
        if offload.offload_to_disk_path:
            changes["offload_to_disk_path"] = disk
            if quantized is not q and any(
                offload.components is None or name in offload.components for name in quantized.components
            ):
                # bitsandbytes went to disk; its torchao stand-in can't (constraint torchao-cannot-offload-to-disk).
                changes["offload_to_disk_path"] = None
                notes.append("group offload to disk -> in RAM (the torchao stand-in can't be stored as safetensors)")
        compiled = config.compile.components if config.compile else []
        if (
            offload.offload_type == "block_level"
            and quantized is not None
            and quantized.backend == "torchao"
            and any(
                name in compiled and (offload.components is None or name in offload.components)
                for name in quantized.components
            )
        ):
            # Without streams (none on a CPU) a compiled torchao model must be offloaded leaf by leaf
            # (constraint compiled-torchao-needs-leaf-or-stream-offload); bitsandbytes had no such limit.
            changes["offload_type"] = "leaf_level"
            notes.append("group offload block_level -> leaf_level (compiled torchao without streams)")
        update["offload"] = offload.replace(**changes)
        if offload.use_stream:
            notes.append("group offload use_stream -> false (no CUDA streams)")
    if config.attention_backend is not None and BACKENDS[config.attention_backend].cuda_only:
        # cuDNN, FlashAttention-3, SageAttention: CUDA kernels (constraint attention-backend-runs-on-the-device);
        # the CPU kernels are applied for real in tests/test_attention.py.
        update["attention_backend"] = None
        notes.append(f"attention {config.attention_backend} -> native (a CUDA kernel)")
    if config.compile is not None and config.compile.backend != "eager":
        # inductor takes ~45 s per graph on a 2-core CPU; eager still goes through dynamo.
        update["compile"] = config.compile.replace(backend="eager")
        notes.append(f"compile backend {config.compile.backend} -> eager")
    cpu = config.replace(**update)
    return config_from_dict(cpu.to_dict()), notes  # re-validated, as a config file would be


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """folder_for(model): the tiny pipeline of a catalog model, built on first use (one per builder)."""
    from advisor.testing import build_tiny_for

    root = tmp_path_factory.mktemp("every-class")
    built: dict = {}

    def folder_for(model: str):
        key = _builder_id(model)
        if key not in built:
            built[key] = build_tiny_for(model, root / key)
        return built[key]

    return folder_for


# Fresh dynamo caches per test, dynamo flags put back (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("dynamo_isolated")


def _load(folder, **kwargs):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(pipe, *, one_step: bool = False) -> np.ndarray:
    """One seeded tiny call; the output has the requested shape and is finite.

    ``one_step`` saves a denoising step where a single one takes every code path (not with two
    experts: Wan 2.2 needs the second step to reach transformer_2).
    """
    from advisor.testing import tiny_call_kwargs

    kwargs = tiny_call_kwargs(type(pipe).__name__, seed=0)
    if one_step and getattr(pipe, "transformer_2", None) is None:
        kwargs["num_inference_steps"] = 1
    out = pipe(**kwargs)
    array = np.asarray(out.images if hasattr(out, "images") else out.frames)
    frames = kwargs.get("num_frames")
    expected = (
        (1, kwargs["height"], kwargs["width"], 3)
        if frames is None
        else (1, frames, kwargs["height"], kwargs["width"], 3)
    )
    assert array.shape == expected
    assert np.isfinite(array).all()
    return array


# --- the tiny pipelines -----------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS, ids=_model_id)
def test_tiny_folder_has_the_catalog_pipeline_class_component_names_and_classes(tiny_folder, model):
    entry = catalog_entry(model)
    index = json.loads((tiny_folder(model) / "model_index.json").read_text())
    assert index["_class_name"] == entry["pipeline_class"]
    for item in entry["components"]:
        assert index.get(item["name"]) == [item["library"], item["class_name"]], item["name"]
    models = {
        name for name, value in index.items() if isinstance(value, list) and value[0] in ("diffusers", "transformers")
    }
    tokenizers_and_schedulers = {n for n in models if n.startswith(("tokenizer", "scheduler"))}
    assert models - tokenizers_and_schedulers == {item["name"] for item in entry["components"]}
    if "transformer_2" in models:  # Wan 2.2 A14B: two experts switching at the boundary
        assert index["boundary_ratio"] == 0.875


@pytest.mark.slow
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_tiny_pipeline_loads_as_the_real_class_and_runs_on_cpu(tiny_folder, group):
    import torch

    pipe = _load(tiny_folder(GROUPS[group][0]))
    assert type(pipe).__name__ == catalog_entry(GROUPS[group][0])["pipeline_class"]
    parameters = sum(
        p.numel() for c in pipe.components.values() if isinstance(c, torch.nn.Module) for p in c.parameters()
    )
    assert parameters < 1_000_000  # tiny: seconds on CPU
    assert _call(pipe).std() > 0  # not a constant picture


def test_wan22_runs_both_experts(tiny_folder):
    pipe = _load(tiny_folder("Wan-AI/Wan2.2-T2V-A14B-Diffusers"))
    calls = {"transformer": 0, "transformer_2": 0}
    for name in calls:
        getattr(pipe, name).register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    _call(pipe)
    # two steps, each with and without the prompt (CFG): the high-noise expert first, then the low-noise one
    assert calls == {"transformer": 2, "transformer_2": 2}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_same_seed_gives_identical_files_and_another_seed_other_weights(tmp_path, group):
    from advisor.testing import build_tiny_for

    model = GROUPS[group][0]
    first, second, other = (
        build_tiny_for(model, tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))
    )
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    weights = [name for name in files if name.suffix == ".safetensors"]
    assert any((first / name).read_bytes() != (other / name).read_bytes() for name in weights)


@pytest.mark.parametrize("pipeline_class", sorted({catalog_entry(m)["pipeline_class"] for m in MODELS}))
def test_tiny_call_kwargs_are_arguments_of_the_pipeline_call(pipeline_class):
    import inspect

    import diffusers

    from advisor.testing import tiny_call_kwargs

    kwargs = tiny_call_kwargs(pipeline_class, seed=0)
    assert set(kwargs) <= set(inspect.signature(getattr(diffusers, pipeline_class).__call__).parameters)
    assert kwargs["num_inference_steps"] == 2 and kwargs["output_type"] == "np"
    assert kwargs["generator"] is not tiny_call_kwargs(pipeline_class, seed=0)["generator"]


def test_build_tiny_for_names_the_catalog_when_the_model_is_not_in_it(tmp_path):
    from advisor.testing import build_tiny_for

    with pytest.raises(ValueError, match="not in the catalog.*black-forest-labs/FLUX.1-dev"):
        build_tiny_for("someone/unknown-model", tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --- every emitted config -----------------------------------------------------------------------------


@pytest.mark.parametrize("model", MODELS, ids=_model_id)
def test_every_emitted_config_passes_the_checks_and_names_components_the_pipeline_has(tiny_folder, model):
    from advisor.run.checks import check_components, check_config
    from advisor.run.classes import Components

    components = Components.of_model(tiny_folder(model))
    assert components.pipeline_class == catalog_entry(model)["pipeline_class"]
    configs = emitted_configs(model)
    for config in configs:
        check_config(config)
        check_components(config, components, f"the tiny {components.pipeline_class}")
    assert any(config.named_components() for config in configs)  # the component check had something to check


def _is_group_offloaded(module) -> bool:
    hooks = getattr(module, "_diffusers_hook", None)
    return hooks is not None and hooks.get_hook("group_offloading") is not None


def _assert_applied(pipe, config: OptimizationConfig) -> None:
    """What each part of the config does is visible on the pipeline: no step was silently skipped."""
    import torch

    parts = pipe.components
    if config.quantization is not None:
        for name in config.quantization.components:
            weights = [m.weight for m in parts[name].modules() if isinstance(m, torch.nn.Linear)]
            packed = ("diffusers.quantizers.gguf",) if config.quantization.backend == "gguf" else ("torchao",)
            assert any(type(w).__module__.startswith(packed) for w in weights), f"{name} is not quantized"
    if config.layerwise_casting is not None:
        for name in config.layerwise_casting.components:
            assert any(p.dtype == torch.float8_e4m3fn for p in parts[name].parameters()), (
                f"{name} is not stored in fp8"
            )
    if config.offload.strategy == "group":
        names = config.offload.components or [n for n, c in parts.items() if isinstance(c, torch.nn.Module)]
        for name in names:
            assert any(_is_group_offloaded(m) for m in parts[name].modules()), f"{name} is not group-offloaded"
    if config.compile is not None:
        for name in config.compile.components:
            compiled = [m for m in parts[name].modules() if getattr(m, "_compiled_call_impl", None) is not None]
            assert compiled, f"{name} is not compiled"
            if not config.compile.regional:
                assert compiled[0] is parts[name]
    if config.vae.tiling:
        assert pipe.vae.use_tiling


def _apply(folder, config: OptimizationConfig):
    """Load the tiny pipeline the way `config` says (dtype, quantization) and apply the config to it.
    A GGUF file of the Hub stands for the full model's: the tiny transformer written as GGUF here, in
    the type the gguf package can write closest to it (Q8_0 for 8 bits, else Q4_0)."""
    import advisor
    from advisor.levers.gguf import bits_per_weight, file_type
    from advisor.testing.gguf import write_gguf

    q = config.quantization
    if q is not None and q.backend == "gguf":
        kind = "Q8_0" if bits_per_weight(file_type(q)) >= 8 else "Q4_0"
        (name,) = q.components
        file = write_gguf(folder / name, folder.parent / f"{folder.name}-{name}-{kind}.gguf", kind)
        config = config.replace(quantization=q.replace(file=str(file)))
    pipe = _load(folder, **advisor.pipeline_kwargs(config, folder))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # provenance made for a GPU; fp16 on CPU
        advisor.apply_config(pipe, config)
    _assert_applied(pipe, config)
    return pipe


def distinct_on_cpu(group: str, disk: str) -> list[tuple[OptimizationConfig, list[str], list[str]]]:
    """(CPU config, what was changed, the emitted configs it stands for) for every model of `group`."""
    found: dict[str, tuple[OptimizationConfig, list[str], list[str]]] = {}
    for model in GROUPS[group]:
        for config in emitted_configs(model):
            cpu, notes = cpu_equivalent(config, disk)
            entry = found.setdefault(cpu.replace(provenance=Provenance()).key, (cpu, notes, []))
            entry[2].append(f"{_model_id(model)}: {config.summary()}")
    return list(found.values())


def _run_key(config: OptimizationConfig) -> str:
    """What decides which code an eager call goes through. Left out, to call fewer times: the dtype, and
    compile (under force_eager a compiled module runs its own forward; the wrappers are checked in
    `_assert_applied`, the tracing in `test_compiled_config_traces_and_runs`)."""
    return json.dumps(
        {
            k: v
            for k, v in config.to_dict().items()
            if k in {"quantization", "layerwise_casting", "offload", "vae", "channels_last"}
        },
        sort_keys=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_emitted_config_applies_to_the_tiny_pipeline_and_it_runs(tiny_folder, group, tmp_path):
    """Each distinct CPU form of the emitted configs is loaded with its quantization and applied; the
    pipeline then runs (compiled code eagerly: tracing takes up to ~15 s a config on 2 cores, with
    offload or casting hooks breaking the graph at every layer; `test_compiled_config_traces_and_runs`
    traces one per class).
    """
    import torch

    folder = tiny_folder(GROUPS[group][0])
    ran: set[str] = set()
    for cpu, notes, sources in distinct_on_cpu(group, str(tmp_path / "offload")):
        what = f"{sources[0]} (+{len(sources) - 1} more) as {cpu.summary()} on CPU; changed: {notes or 'nothing'}"
        try:
            pipe = _apply(folder, cpu)
            if _run_key(cpu) not in ran:
                ran.add(_run_key(cpu))
                with torch.compiler.set_stance("force_eager"):
                    _call(pipe, one_step=True)
        except Exception as exc:
            raise AssertionError(f"{what}: {type(exc).__name__}: {exc}") from exc
    assert ran


@pytest.mark.slow
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_compiled_config_traces_and_runs(tiny_folder, group, tmp_path):
    """One emitted compile config per class, traced for real by dynamo (eager backend): preferring
    fullgraph=True, which fails on any graph break in the model's blocks."""
    configs = [cpu for cpu, _, _ in distinct_on_cpu(group, str(tmp_path)) if cpu.compile is not None]
    assert configs, f"recommend emitted no compile config for {GROUPS[group]}"
    config = next((c for c in configs if c.compile.fullgraph), configs[0])
    import torch._dynamo.utils

    pipe = _apply(tiny_folder(GROUPS[group][0]), config)
    torch._dynamo.utils.counters.clear()
    _call(pipe)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # dynamo did trace the blocks


EMPTY_REPEATED_MODELS = ["stabilityai/stable-diffusion-3.5-large", "THUDM/CogVideoX-5b"]


@pytest.mark.parametrize("model", EMPTY_REPEATED_MODELS, ids=_model_id)
def test_the_engine_compiles_whole_models_whose_class_lists_no_repeated_blocks(model):
    """diffusers 0.42 refuses compile_repeated_blocks where `_repeated_blocks = []` (SD3, CogVideoX)."""
    compiled = [c for c in emitted_configs(model) if c.compile is not None]
    assert compiled and all(c.compile.regional is False for c in compiled)


@pytest.mark.slow
@pytest.mark.parametrize("model", EMPTY_REPEATED_MODELS, ids=_model_id)
def test_a_hand_written_regional_compile_falls_back_to_the_whole_model(tiny_folder, model, tmp_path):
    """`compile.regional: true` written by hand for such a class: a ConfigWarning, whole-model compile, and it runs."""
    import advisor
    from advisor.errors import ConfigWarning

    config, _ = cpu_equivalent(next(c for c in emitted_configs(model) if c.compile is not None), str(tmp_path))
    config = config.replace(compile=config.compile.replace(regional=True))
    pipe = _load(tiny_folder(model), **advisor.pipeline_kwargs(config, tiny_folder(model)))
    with pytest.warns(ConfigWarning, match="has no `_repeated_blocks`; compiling the whole model instead"):
        advisor.apply_config(pipe, config)
    _call(pipe)


def test_the_classes_with_empty_repeated_blocks_are_the_ones_named_here():
    """The tests above name these classes; this keeps that list true to the installed diffusers."""
    import importlib

    denoisers = {
        getattr(importlib.import_module(item["library"]), item["class_name"])
        for model in MODELS
        for item in catalog_entry(model)["components"]
        if item["name"].startswith(("transformer", "unet"))
    }
    assert {cls.__name__ for cls in denoisers if cls._repeated_blocks == []} == EMPTY_REPEATED_BLOCKS_CLASSES


# --- every emitted config, as it would run on the card -----------------------------------------------

# What the virtual device can't run, for a reason outside the config (said by the rehearsal as "not
# rehearsed", never as passed): group offloading to disk writes safetensors files of the weights (a
# virtual weight has no bytes to write); an attention kernel whose package is not installed here
# (the decision suite plans sage attention for a machine that has it: diffusers says "missing package").
NOT_REHEARSABLE = (
    "offload_to_disk_path",
    "because of missing package",
    "the rehearsal runs one",  # a split over several processes
    "the rehearsal has one",  # components over several GPUs
)


def _rehearsal_key(config: OptimizationConfig) -> str:
    """What decides placement and dtype on the card (compile and the dtype's name aside)."""
    return json.dumps(
        {
            k: v
            for k, v in config.to_dict().items()
            if k in {"quantization", "layerwise_casting", "offload", "vae", "attention_backend", "step_cache"}
        },
        sort_keys=True,
    )


@pytest.mark.slow  # about 4 minutes of CPU for every class's distinct configs
@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_emitted_config_rehearses_on_a_virtual_gpu(tiny_folder, group):
    """Issue 28: each distinct emitted config (its GPU form: bitsandbytes, streams, CUDA attention) is
    rehearsed on the tiny pipeline on a virtual CUDA device: the CPU runs above can't see a weight or a
    quantization state left on the wrong device, because there the onload and offload devices are
    the same. None may fail; what can't be rehearsed must name why (`NOT_REHEARSABLE`)."""
    import torch
    from diffusers import DiffusionPipeline

    from advisor.probe.models import load_profile
    from advisor.probe.workload import Workload
    from advisor.rehearse.build import rehearsal_geometry
    from advisor.rehearse.rehearsal import rehearse
    from advisor.testing import tiny_call_kwargs

    folder = tiny_folder(GROUPS[group][0])
    profile = load_profile(str(folder))
    call = tiny_call_kwargs(profile.pipeline_class)
    workload = Workload(profile.workload, call["height"], call["width"], call.get("num_frames") or 1, steps=2)
    geometry, tokens, calls, passes = rehearsal_geometry(profile, workload)
    seen: dict[str, str] = {}
    rehearsed = 0
    loaded = {}  # one load per dtype; each rehearsal takes a copy (it rewrites the weights)
    for model in GROUPS[group]:
        for config in emitted_configs(model):
            key = _rehearsal_key(config)
            if key in seen:
                continue
            if config.dtype not in loaded:
                loaded[config.dtype] = DiffusionPipeline.from_pretrained(folder, dtype=getattr(torch, config.dtype))
            pipe = copy.deepcopy(loaded[config.dtype])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # fp16 on a class that prefers bf16, and the like
                result = rehearse(
                    pipe, config, geometry, text_tokens=tokens, calls_per_step=calls, prompt_passes=passes
                )
            what = f"{_model_id(model)}: {config.summary()}"
            assert result.failure is None, f"{what} would fail on the card: {result.failure}"
            if result.not_rehearsed:
                assert any(reason in result.not_rehearsed for reason in NOT_REHEARSABLE), (
                    f"{what}: not rehearsed: {result.not_rehearsed}"
                )
            else:
                rehearsed += 1
            seen[key] = what
    assert rehearsed > 0
