"""Attention backends: the facts against diffusers' own, the constraints that refuse what can't run,
the estimate's speed-up, the space tune searches, and each CPU-runnable kernel applied for real."""

from __future__ import annotations

import numpy as np
import pytest

from advisor.config import OptimizationConfig
from advisor.constraints import Platform, first_violation, violations
from advisor.errors import ConfigError
from advisor.levers.attention import BACKENDS, PROPOSED


CPU = Platform(
    None, None, {"torch": "2.13.0", "diffusers": "0.42.1"}, cuda_devices=0, no_cuda="this machine has no CUDA GPU"
)
SAGE = {"torch": "2.13.0", "diffusers": "0.42.1", "sageattention": "2.2.0"}


def gpu(capability: str, packages: dict | None = None, **fields) -> Platform:
    return Platform("cuda", capability, packages, **fields)


def refused(name: str, platform: Platform, dtype: str = "bfloat16", device: str = "cuda") -> str | None:
    violation = first_violation(OptimizationConfig(device=device, dtype=dtype, attention_backend=name), platform)
    return violation.message if violation else None


# --- the facts, against the installed diffusers ------------------------------------------------------


def test_every_backend_is_one_diffusers_knows_with_the_versions_it_requires():
    from diffusers.models import attention_dispatch as dispatch

    names = {member.value for member in dispatch.AttentionBackendName}
    assert set(BACKENDS) <= names and set(PROPOSED) <= set(BACKENDS)
    required = {
        "flash-attn": dispatch._REQUIRED_FLASH_VERSION,
        "sageattention": dispatch._REQUIRED_SAGE_VERSION,
        "xformers": dispatch._REQUIRED_XFORMERS_VERSION,
    }
    for backend in BACKENDS.values():
        if backend.package in required:
            assert backend.min_version == required[backend.package], backend.name


def test_half_only_backends_are_those_diffusers_registers_with_a_bf16_or_fp16_check():
    from diffusers.models import attention_dispatch as dispatch

    registry = dispatch._AttentionBackendRegistry._constraints
    for backend in BACKENDS.values():
        checks = {fn.__name__ for fn in registry[dispatch.AttentionBackendName(backend.name)]}
        assert backend.half_only == bool(checks & {"_check_qkv_dtype_bf16_or_fp16", "_check_qkv_dtype_bf16"}), (
            backend.name
        )
        if "_check_device_cuda" in checks:  # diffusers itself says CUDA only
            assert backend.cuda_only, backend.name


# --- constraints ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["_native_cudnn", "_native_efficient", "flash", "_flash_3", "sage", "xformers"])
def test_cuda_only_kernels_are_refused_on_a_cpu_with_the_way_out(name):
    message = refused(name, CPU, device="cpu")
    assert (
        message
        == f"`attention_backend: {name}` needs a CUDA GPU and this machine has no CUDA GPU; use `attention_backend: native`"
    )


@pytest.mark.parametrize("name", ["native", "_native_math", "flex"])
def test_cpu_kernels_pass_on_a_cpu(name):
    assert refused(name, CPU, dtype="float32", device="cpu") is None


def test_capability_dtype_package_and_download_limits():
    # FlashAttention-3 has Hopper kernels only; cuDNN attention needs Ampere or newer.
    fa3 = {"flash-attn-3": "3.0.0b1"}
    assert "compute capability >= 9.0" in refused("_flash_3", gpu("8.9", fa3))
    assert refused("_flash_3", gpu("9.0", fa3)) is None
    assert "kernels for compute capability 9.0 only" in refused("_flash_3", gpu("10.0", fa3))
    assert "compute capability >= 8.0" in refused("_native_cudnn", gpu("7.5"))
    # bf16/fp16 only: a float32 pipeline can't use them (diffusers would fail in the first step).
    assert "takes bf16 or fp16 only" in refused("sage", gpu("8.9", SAGE), dtype="float32")
    # packages: missing, too old, unknown (another machine: not assumed missing)
    assert "pip install sageattention" in refused("sage", gpu("8.9", {"torch": "2.13.0"}))
    assert "sageattention >= 2.1.1, 1.0.6 is installed" in refused("sage", gpu("8.9", {"sageattention": "1.0.6"}))
    assert refused("sage", gpu("8.9", None)) is None
    # hub kernels download at set time: refused offline, or without the `kernels` package
    assert "HF_HUB_OFFLINE is set" in refused("flash_hub", gpu("9.0", {"kernels": "0.12.0"}, offline=True))
    assert "pip install kernels" in refused("flash_hub", gpu("9.0", {"torch": "2.13.0"}))
    assert refused("flash_hub", gpu("9.0", {"kernels": "0.12.0"})) is None


def test_a_config_check_refuses_a_kernel_this_cpu_cannot_run_before_loading():
    from advisor.run.checks import check_machine

    with pytest.raises(ConfigError, match=r"`attention_backend: _native_cudnn` needs a CUDA GPU"):
        check_machine(OptimizationConfig(device="cpu", dtype="bfloat16", attention_backend="_native_cudnn"))
    with pytest.raises(ConfigError, match=r"`attention_backend: _native_flash` takes bf16 or fp16 only"):
        check_machine(OptimizationConfig(device="cpu", dtype="float32", attention_backend="_native_flash"))


def test_the_probe_table_agrees_with_the_constraints():
    from advisor.probe.hardware import GpuInfo, attention_backends

    on_cpu = attention_backends({"torch": "2.13.0"}, [])
    assert {name for name, status in on_cpu.items() if status.usable} == {
        "native",
        "_native_math",
        "_native_flash",
        "flex",
    }
    assert "needs a CUDA GPU" in on_cpu["sage"].reason
    rtx4090 = GpuInfo(0, "NVIDIA GeForce RTX 4090", 24 * 2**30, 24 * 2**30, 0, compute_capability="8.9")
    on_4090 = attention_backends(SAGE, [rtx4090])
    assert on_4090["sage"].usable and "lossy" in on_4090["sage"].reason and "2.2.0" in on_4090["sage"].reason
    assert not on_4090["_flash_3"].usable and not on_4090["flash"].usable
    for name, status in on_4090.items():
        config = OptimizationConfig(attention_backend=name)
        assert status.usable == (not violations(config, gpu("8.9", SAGE))), name


# --- the space and the estimate ----------------------------------------------------------------------


def test_the_space_offers_only_kernels_that_run_and_are_published_faster():
    from advisor.levers.attention import attention_choices

    assert attention_choices(CPU, "float32") == ["native"]
    assert attention_choices(gpu("9.0"), "bfloat16") == ["native", "_native_cudnn"]  # torch's own: no install assumed
    assert attention_choices(gpu("9.0"), "float32") == ["native"]
    assert attention_choices(gpu("8.9"), "bfloat16") == ["native"]  # cuDNN's gain is published for Hopper
    assert attention_choices(gpu("8.9", SAGE), "bfloat16") == ["native", "sage"]
    assert attention_choices(gpu("9.0", {**SAGE, "flash-attn-3": "3.0.0b1"}), "bfloat16") == [
        "native",
        "_native_cudnn",
        "_flash_3",
        "sage",
    ]


def test_a_point_names_the_kernel_only_where_there_is_a_choice():
    from advisor.plan.scenario import make_scenario
    from advisor.plan.space import SearchSpace
    from advisor.probe.models import load_profile
    from advisor.probe.target import planned_target
    from advisor.probe.workload import make_workload

    profile = load_profile("flux-dev")
    h100 = make_scenario(profile, make_workload(profile), planned_target(machine=None, gpu="H100"))
    space = SearchSpace.for_scenario(h100)
    plain = SearchSpace.for_profile(profile, device="cuda")
    assert space.choices("attention") == ["native", "_native_cudnn"] and space.size() == 2 * plain.size()
    points = list(space.points())
    assert {p["attention"] for p in points} == {"native", "_native_cudnn"}
    point = next(p for p in points if p["attention"] == "_native_cudnn")
    config = space.candidate(point, h100).config
    assert config.attention_backend == "_native_cudnn" and space.params_of(config)["attention"] == "_native_cudnn"
    assert all("attention" not in p for p in plain.points())


def test_the_estimate_speeds_up_the_attention_share_only():
    """Flux at 1024x1024 attends over 4096 + 512 tokens with a width of 3072: attention FLOPs 4N^2d
    against roughly 24Nd^2 for the matmuls, N/6d = a quarter of them. A 1.75x kernel saves
    (1 - 1/1.75) of that fifth of the denoising compute, about 8.6%; never more than the share."""
    from advisor.plan.estimate import estimate
    from advisor.probe.models import load_profile
    from advisor.probe.target import planned_target
    from advisor.probe.workload import make_workload

    profile = load_profile("flux-dev")
    workload = make_workload(profile)
    h100 = planned_target(machine=None, gpu="H100")
    native = estimate(profile, workload, OptimizationConfig(), h100)
    cudnn = estimate(profile, workload, OptimizationConfig(attention_backend="_native_cudnn"), h100)
    saved = 1 - cudnn.latency_breakdown["step_compute_s"] / native.latency_breakdown["step_compute_s"]
    assert 0.05 < saved < 0.20 * (1 - 1 / 1.75) + 0.05
    assert cudnn.peak_vram_bytes == native.peak_vram_bytes  # a kernel choice, not a memory one
    rtx4090 = planned_target(machine=None, gpu="RTX 4090")  # cuDNN's gain is published for Hopper only
    assert estimate(
        profile, workload, OptimizationConfig(attention_backend="_native_cudnn"), rtx4090
    ).latency_s == pytest.approx(estimate(profile, workload, OptimizationConfig(), rtx4090).latency_s)


def test_masked_attention_runs_the_memory_efficient_kernel_for_its_share_only():
    """torch's SDPA takes its flash kernel only for calls without a mask (memory-efficient: 144.8
    against flash's 229.5 TFLOPs on an H100); a kernel's published speed-up was measured without
    one, so the masked share is timed at the memory-efficient kernel's speed whatever the backend."""
    from advisor.levers import StepContext
    from advisor.levers.attention import AttentionKernel

    lever = AttentionKernel()
    efficient = 144.8 / 229.5

    def speed(backend, share, dtype="bfloat16", capability=9.0):
        step = StepContext("cuda", capability, 28, "X", masked_attention_share=share)
        return lever.attention_speedup(OptimizationConfig(dtype=dtype, attention_backend=backend), step)

    assert speed(None, 0.0) == 1.0 and speed(None, 1.0) == pytest.approx(efficient)
    assert speed(None, 0.02) == pytest.approx(1 / (0.98 + 0.02 / efficient))  # LTX: its cross-attention
    assert speed("_native_cudnn", 1.0) == pytest.approx(efficient)
    assert speed("_native_cudnn", 0.5) == pytest.approx(1 / (0.5 / 1.75 + 0.5 / efficient))
    assert speed(None, 1.0, dtype="float32") == 1.0  # no flash kernel in float32: nothing changes
    assert speed(None, 1.0, capability=7.5) == 1.0  # nor below compute capability 8.0


def test_kernels_without_mask_support_are_never_planned_for_a_model_that_masks():
    """Chroma masks every call; Z-Image only a batch of captions of unequal length, which guidance
    batched with a negative prompt makes, and its Turbo card runs unguided (guidance 0)."""
    from advisor.levers.attention import AttentionKernel
    from advisor.plan.scenario import make_scenario
    from advisor.plan.space import SearchSpace
    from advisor.probe.models import load_profile
    from advisor.probe.target import planned_target
    from advisor.probe.workload import make_workload

    def refused(model, **job):
        profile = load_profile(model)
        target = planned_target(machine=None, gpu="RTX 4090", ram=64 * 2**30)
        scenario = make_scenario(profile, make_workload(profile, **job), target, packages=SAGE, quality="fast")
        sage = OptimizationConfig(dtype="bfloat16", attention_backend="sage")
        return [f.name for f in AttentionKernel.filters if f.check(sage, scenario)], scenario

    assert refused("chroma")[0] == ["attention-kernel-takes-the-models-mask"]
    assert refused("flux-dev")[0] == []
    assert refused("z-image-turbo")[0] == []  # its card: guidance 0, one sample a call
    guided, scenario = refused("z-image-turbo", guidance_scale=5.0)
    assert scenario.batched_calls and guided == ["attention-kernel-takes-the-models-mask"]
    assert "sage" in SearchSpace.for_scenario(scenario).choices("attention")  # offered, then filtered


def test_estimating_a_config_whose_kernel_the_model_refuses_warns(tmp_path):
    import json
    import os
    import subprocess

    from tuning import ADVISOR

    path = tmp_path / "sage.json"
    path.write_text(json.dumps(OptimizationConfig(device="cuda", attention_backend="sage").to_dict()))
    done = subprocess.run(
        [ADVISOR, "estimate", "chroma", "--gpu", "RTX 4090", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "can't run it as written: `attention_backend: sage` takes no attention mask" in done.stderr


def test_sage_is_lossy_with_its_quality_cost():
    from advisor.plan.quality import is_lossy, quality_cost

    assert is_lossy(OptimizationConfig(attention_backend="sage"))
    assert not is_lossy(OptimizationConfig(attention_backend="_native_cudnn"))
    assert "int8" in quality_cost(OptimizationConfig(attention_backend="sage"))[0]


# --- applied for real on the CPU --------------------------------------------------------------------


def _generate(path, config: OptimizationConfig) -> tuple[np.ndarray, set]:
    """The tiny pipeline's image under `config`, and the attention backends its processors hold."""
    from advisor.run.apply import load_pipeline
    from advisor.testing import tiny_call_kwargs

    pipe = load_pipeline(path, config)
    backends = {
        getattr(m.processor, "_attention_backend", None) for m in pipe.transformer.modules() if hasattr(m, "processor")
    }
    return np.asarray(pipe(**tiny_call_kwargs("image", seed=0)).images, dtype=np.float64), backends


@pytest.fixture(scope="module")
def default_image(tiny_flux_dir):
    return _generate(tiny_flux_dir, OptimizationConfig(device="cpu", dtype="float32"))[0]


@pytest.mark.usefixtures("dynamo_isolated")
@pytest.mark.filterwarnings(
    "ignore:flex_attention called without torch.compile"
)  # the unfused path is the point on a CPU
@pytest.mark.parametrize("name", ["_native_math", "flex"])
def test_each_cpu_kernel_is_applied_and_gives_the_default_output_within_tolerance(tiny_flux_dir, default_image, name):
    from diffusers.models.attention_dispatch import AttentionBackendName

    default = default_image
    image, backends = _generate(
        tiny_flux_dir, OptimizationConfig(device="cpu", dtype="float32", attention_backend=name)
    )
    assert backends == {AttentionBackendName(name)}
    # The same attention computed another way: float32 rounding differs, nothing else (images in [0, 1]).
    assert np.abs(image - default).max() < 1e-3


def test_a_published_speed_up_applies_only_where_it_was_measured():
    """PyTorch 2.5's cuDNN attention figure ('up to 75% over FlashAttention-2') was measured on an
    H100: a Hopper gets it; an RTX 5090 (12.0) or a B200 (10.0) are unmeasured, so 1x, not 1.75x."""
    cudnn = BACKENDS["_native_cudnn"]
    assert cudnn.speedup_at(9.0) == 1.75
    assert cudnn.speedup_at(12.0) == cudnn.speedup_at(10.0) == cudnn.speedup_at(8.9) == 1.0
