"""What can run where: each constraint on its own, and one made-up constraint seen by every caller."""

import dataclasses

import pytest

from advisor import constraints
from advisor.config import Compile, LayerwiseCasting, Offload, OptimizationConfig, Quantization
from advisor.constraints import Platform, device_is_available, every_constraint, installed_diffusers_supports_it
from advisor.errors import ConfigError
from advisor.levers.bitsandbytes import bitsandbytes_needs_cuda
from advisor.levers.offload import cpu_offload_needs_cuda, streams_need_cuda
from advisor.levers.quantization import quantization_backend_installed
from advisor.levers.torch_compile import compile_needs_triton_on_windows, fullgraph_breaks_on_offload_hooks
from advisor.levers.torchao import (
    compiled_torchao_needs_leaf_or_stream_offload,
    fp8_compute_needs_sm89,
    int4_weight_only_needs_cuda,
    torchao_cannot_offload_to_disk,
)


NF4 = Quantization(backend="bitsandbytes_4bit", components=["transformer"])
INT8 = Quantization(backend="torchao", components=["transformer"])
FP8 = Quantization(backend="torchao", components=["transformer"], scheme="float8_dynamic")
ADA = Platform("cuda", "8.9", None)  # an RTX 4090, planned for from elsewhere
AMPERE = Platform("cuda", "8.0", None)
CPU_ONLY = Platform(
    None, None, {"torch": "2.13.0", "torchao": "0.18.0", "bitsandbytes": "0.49.0", "diffusers": "0.42.1"}
)


def test_every_constraint_names_a_config_key_a_reason_and_a_source():
    every = every_constraint()
    assert len({c.name for c in every}) == len(every)
    fields = {f.name for f in dataclasses.fields(OptimizationConfig)}
    for c in every:
        assert c.key.split(".")[0] in fields, c.key
        assert len(c.reason) > 20 and c.source.startswith("https://")


def test_bitsandbytes_needs_cuda():
    config = OptimizationConfig(quantization=NF4)
    assert bitsandbytes_needs_cuda(config, ADA) is None
    assert "`quantization.backend: bitsandbytes_4bit` needs CUDA" in bitsandbytes_needs_cuda(config, CPU_ONLY)
    on_cpu = config.replace(device="cpu")
    assert "needs `device: cuda`" in bitsandbytes_needs_cuda(on_cpu, ADA)
    assert bitsandbytes_needs_cuda(OptimizationConfig(), CPU_ONLY) is None


def test_a_backend_must_be_installed_only_where_the_packages_are_known():
    config = OptimizationConfig(quantization=INT8)
    assert "pip install torchao" in quantization_backend_installed(config, Platform("cuda", "8.9", {"torch": "2.13"}))
    assert quantization_backend_installed(config, ADA) is None  # another machine: can't tell


def test_fp8_compute_needs_sm89():
    fp8 = OptimizationConfig(quantization=FP8, compile=Compile())
    assert fp8_compute_needs_sm89(fp8, ADA) is None
    assert "this GPU has 8.0" in fp8_compute_needs_sm89(fp8, AMPERE)
    assert "on CPU use int8_weight_only" in fp8_compute_needs_sm89(fp8.replace(device="cpu"), CPU_ONLY)


def test_int4_weight_only_needs_cuda_kernels():
    int4 = OptimizationConfig(
        device="cpu",
        quantization=Quantization(backend="torchao", components=["transformer"], scheme="int4_weight_only"),
    )
    assert "CUDA int4 kernels" in int4_weight_only_needs_cuda(int4, CPU_ONLY)
    assert int4_weight_only_needs_cuda(int4.replace(device="cuda"), ADA) is None


def test_placement_needs_what_it_moves_weights_to():
    assert "`device: cuda` but" in device_is_available(OptimizationConfig(), CPU_ONLY)
    assert "has 1 CUDA device" in device_is_available(OptimizationConfig(device="cuda:1"), ADA)
    assert device_is_available(OptimizationConfig(device="cpu"), CPU_ONLY) is None
    model = OptimizationConfig(device="cpu", offload=Offload(strategy="group"))
    assert cpu_offload_needs_cuda(model, CPU_ONLY) is None  # group offload onto the CPU is valid (tests use it)
    assert "`offload.strategy: model`" in cpu_offload_needs_cuda(
        OptimizationConfig(offload=Offload(strategy="model")), CPU_ONLY
    )
    streamed = OptimizationConfig(device="cpu", offload=Offload(strategy="group", use_stream=True))
    assert "`offload.use_stream: true` needs CUDA streams" in streams_need_cuda(streamed, CPU_ONLY)


def test_installed_diffusers_version_is_checked():
    grouped = OptimizationConfig(offload=Offload(strategy="group"))
    old = Platform("cuda", "8.9", {"diffusers": "0.31.0"})
    assert "upgrade" in installed_diffusers_supports_it(grouped, old)
    assert installed_diffusers_supports_it(grouped, Platform("cuda", "8.9", {"diffusers": "0.42.1"})) is None
    assert installed_diffusers_supports_it(grouped, ADA) is None


def test_torchao_and_group_offload_restrictions():
    to_disk = OptimizationConfig(quantization=INT8, offload=Offload(strategy="group", offload_to_disk_path="/tmp/o"))
    assert "cannot hold `transformer`" in torchao_cannot_offload_to_disk(to_disk, ADA)
    assert torchao_cannot_offload_to_disk(OptimizationConfig(quantization=NF4, offload=to_disk.offload), ADA) is None
    only_encoder = to_disk.replace(offload=to_disk.offload.replace(components=["text_encoder"]))
    assert torchao_cannot_offload_to_disk(only_encoder, ADA) is None  # per component: the transformer stays put
    blocks = OptimizationConfig(quantization=INT8, compile=Compile(), offload=Offload(strategy="group"))
    assert compiled_torchao_needs_leaf_or_stream_offload(blocks, ADA)
    streamed = blocks.replace(offload=Offload(strategy="group", use_stream=True))
    assert compiled_torchao_needs_leaf_or_stream_offload(streamed, ADA) is None
    assert compiled_torchao_needs_leaf_or_stream_offload(blocks.replace(compile=None), ADA) is None


def test_fullgraph_breaks_where_hooks_wrap_the_compiled_layers():
    assert "is group-offloaded" in fullgraph_breaks_on_offload_hooks(
        OptimizationConfig(compile=Compile(), offload=Offload(strategy="group")), ADA
    )
    cast = OptimizationConfig(compile=Compile(), layerwise_casting=LayerwiseCasting(components=["transformer"]))
    assert "is layerwise-cast" in fullgraph_breaks_on_offload_hooks(cast, ADA)
    assert (
        fullgraph_breaks_on_offload_hooks(
            OptimizationConfig(compile=Compile(), offload=Offload(strategy="model")), ADA
        )
        is None
    )


def test_anywhere_refuses_only_what_no_machine_can_run():
    assert constraints.violations(OptimizationConfig(quantization=FP8, compile=Compile()), Platform.anywhere()) == []
    broken = OptimizationConfig(compile=Compile(), offload=Offload(strategy="group"))
    assert [v.constraint.name for v in constraints.violations(broken, Platform.anywhere())] == [
        "fullgraph-breaks-on-offload-hooks"
    ]


@pytest.fixture
def made_up_constraint():
    """A constraint that exists only in this test: torchao is refused everywhere."""

    @constraints.constraint(
        "no-torchao-in-this-test", "quantization.backend", "a made-up limit, for the test only", "https://example.org"
    )
    def no_torchao(config, platform):
        if config.quantization and config.quantization.backend == "torchao":
            return "`quantization.backend: torchao` is refused by a made-up constraint"
        return None

    yield "no-torchao-in-this-test"
    constraints.CONSTRAINTS.pop()


def test_a_new_constraint_is_seen_by_the_engine_the_config_check_and_the_probe(made_up_constraint):
    from advisor.plan.recommend import recommend
    from advisor.plan.scenario import make_scenario
    from advisor.probe.hardware import GpuInfo, quantization_backends
    from advisor.probe.models import load_profile
    from advisor.probe.target import planned_target
    from advisor.probe.workload import make_workload
    from advisor.run.checks import check_config, check_machine

    # the rule engine: torchao candidates are rejected by it, and none is proposed
    profile = load_profile("flux-dev")
    scenario = make_scenario(profile, make_workload(profile), planned_target(machine=None, gpu="H100"))
    result = recommend(scenario)
    assert result.rejected[made_up_constraint] > 0
    proposed = [result.best, *result.alternatives]
    assert all(s.config.quantization is None or s.config.quantization.backend != "torchao" for s in proposed)

    # the config check (any machine) and the machine check (this one)
    config = OptimizationConfig(device="cpu", quantization=INT8)
    for check in (check_config, check_machine):
        with pytest.raises(ConfigError, match="refused by a made-up constraint"):
            check(config)

    # the probe's backend table
    h100 = GpuInfo(0, "NVIDIA H100", 80 * 2**30, 80 * 2**30, 0, compute_capability="9.0")
    table = quantization_backends({"torch": "2.13.0", "torchao": "0.18.0", "bitsandbytes": "0.49.0"}, [h100])
    assert not table["torchao"].usable and "made-up" in table["torchao"].reason
    assert table["bitsandbytes"].usable


def test_docs_list_every_constraint():
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "rules.md").read_text()
    for c in every_constraint():
        assert f"`{c.name}` | constraint on `{c.key}`" in page and c.source in page


def test_compile_on_windows_needs_a_triton_build():
    """inductor writes Triton kernels for the GPU, and Triton has no official Windows build (PyTorch's
    inductor-on-Windows tutorial): compiling there needs the community triton-windows, which a plan
    for a Windows machine the advisor can't see does not assume."""
    compiled = OptimizationConfig(compile=Compile())
    windows_unknown = Platform("cuda", "8.9", None, os="windows")
    message = compile_needs_triton_on_windows(compiled, windows_unknown)
    assert message.startswith("`compile`") and "triton-windows" in message and "not assumed" in message
    without = Platform("cuda", "8.9", {"torch": "2.13.0"}, os="windows")
    assert "not installed" in compile_needs_triton_on_windows(compiled, without)
    with_triton = Platform("cuda", "8.9", {"torch": "2.13.0", "triton-windows": "3.4.0"}, os="windows")
    assert compile_needs_triton_on_windows(compiled, with_triton) is None
    assert compile_needs_triton_on_windows(compiled, Platform("cuda", "8.9", None)) is None  # Linux ships Triton
    assert compile_needs_triton_on_windows(OptimizationConfig(), windows_unknown) is None
    eager = OptimizationConfig(compile=Compile(backend="eager"))  # no kernels generated
    assert compile_needs_triton_on_windows(eager, windows_unknown) is None
