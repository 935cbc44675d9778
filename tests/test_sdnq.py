"""SDNQ (issue 30): a config that names it is expressible, sized by its layout, loads through
`load_pipeline` and runs on the CPU (sdnq is pure torch)."""

from __future__ import annotations

import numpy as np
import pytest

from advisor.config import OptimizationConfig, Quantization
from advisor.levers.sdnq import bytes_per_weight, group_size


def _sdnq(weights: str, *components: str) -> OptimizationConfig:
    return OptimizationConfig(
        device="cpu", quantization=Quantization(backend="sdnq", weights=weights, components=list(components))
    )


@pytest.fixture(scope="module")
def flux_256(tmp_path_factory):
    """The tiny Flux at scale=8: a 256-wide transformer, so that 4-bit layers split into groups of 64."""
    from advisor.testing import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("sdnq") / "flux", scale=8)


@pytest.mark.parametrize("weights", ["uint4", "int6", "int8", "float8_e4m3fn"])
def test_each_converted_layer_holds_the_bytes_its_layout_says(flux_256, weights):
    """sdnq 0.2.8's layout, from its quantizer: the packed bits, and per group of 2**(bits+2) input
    columns (or the whole row) a float32 scale, plus a float32 zero point for unsigned types."""
    import torch

    import advisor

    pipe = advisor.load_pipeline(flux_256, _sdnq(weights, "transformer"))
    layers = [m for m in pipe.transformer.modules() if type(m).__name__ == "SDNQLinear"]
    assert layers
    for layer in layers:
        rows, columns = layer.sdnq_dequantizer.original_shape
        held = sum(t.numel() * t.element_size() for name, t in layer.state_dict().items() if name != "bias")
        assert held == pytest.approx(rows * columns * bytes_per_weight(weights, columns), abs=1), layer
    assert isinstance(layers[0].bias, torch.Tensor) and layers[0].bias.dtype == torch.bfloat16


def test_group_sizes_follow_sdnqs_quantizer_for_wide_narrow_and_odd_layers():
    """sdnq_quantize_layer: 2**(bits+2) columns where they divide the row; else it lowers the number of
    groups until one divides (13824 = 12 x 1152 for int8's 1024), giving up at one group; a row
    narrower than a group is one group."""
    assert group_size("uint4", 3072) == 64 and group_size("int8", 3072) == 1024 and group_size("int6", 5120) == 256
    assert group_size("int8", 13824) == 1152
    assert group_size("int8", 2050) == 2050  # 2 groups of 1025 would not divide 1024's count: one row
    assert group_size("int8", 256) == 256  # narrower than a group: one scale per row
    # 4-bit of a 3072-wide layer: 0.5 byte, and 8 bytes of scale and zero point per 64 weights
    assert bytes_per_weight("uint4", 3072) == pytest.approx(0.5 + 8 / 64)
    assert bytes_per_weight("uint3", 3072) == bytes_per_weight("uint4", 3072)  # 32 columns a group: no saving
    assert bytes_per_weight("float4_e2m1fn", 3072) == pytest.approx(0.5 + 4 / 64)  # no zero point


@pytest.mark.parametrize("columns", [2050, 13824])
def test_odd_widths_get_the_groups_sdnq_gives_them(columns):
    import torch
    from sdnq.quantizer import sdnq_quantize_layer_weight

    weight = torch.randn(8, columns, dtype=torch.bfloat16)
    _, tensors = sdnq_quantize_layer_weight(weight, layer_class_name="Linear", weights_dtype="int8")
    assert tensors["scale"].numel() == 8 * columns // group_size("int8", columns)


def test_load_pipeline_quantizes_a_transformers_text_encoder_with_sdnqs_own_config(flux_256):
    """A transformers model takes sdnq's SDNQConfig (importing sdnq registers it with transformers)."""
    import advisor
    from advisor.testing import tiny_call_kwargs

    pipe = advisor.load_pipeline(flux_256, _sdnq("int8", "transformer", "text_encoder_2"))
    assert any(type(m).__name__ == "SDNQLinear" for m in pipe.text_encoder_2.modules())
    image = pipe(**tiny_call_kwargs("image", seed=0)).images[0]
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all()


def test_the_script_gives_each_library_its_sdnq_config(tiny_flux_dir):
    from advisor.run.emit import emit_python

    script = emit_python(str(tiny_flux_dir), _sdnq("uint4", "transformer", "text_encoder_2"))
    assert '"transformer": SDNQConfig(weights_dtype="uint4")' in script
    assert '"text_encoder_2": TransformersSDNQConfig(weights_dtype="uint4")' in script
    assert "from sdnq import SDNQConfig as TransformersSDNQConfig" in script


def test_weights_from_another_backends_list_are_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"`quantization.weights: float8` is not one of sdnq's: int8, int7"):
        Quantization(backend="sdnq", weights="float8", components=["transformer"])
    with pytest.raises(ValueError, match="not one of quanto's"):
        Quantization(backend="quanto", weights="uint4", components=["transformer"])


def test_flux_in_sdnq_uint4_is_sized_from_its_layout():
    """FLUX.1-dev's transformer: 11.9 B parameters, nearly all in linear layers of 3072 or 12288
    inputs: 4-bit with a float32 scale and zero point per 64 weights is 0.625 bytes a weight. sdnq
    leaves 92 M of its linear weights in bf16 by name and size (module_skip_keys_dict, minimum_allowed_numel),
    which the estimate converts: 7.57 GB held, the estimate within 2% under."""
    from advisor.plan.estimate import estimate
    from advisor.probe.models import load_profile
    from advisor.probe.target import planned_target
    from advisor.probe.workload import make_workload

    profile = load_profile("flux-dev")
    target = planned_target(machine=None, gpu="RTX 4090")
    config = _sdnq("uint4", "transformer").replace(device="cuda")
    held = estimate(profile, make_workload(profile), config, target).weight_bytes["transformer"]
    assert 0.98 * 7.57e9 < held <= 7.57e9


def test_a_lora_on_sdnq_weights_fails_as_its_refusal_says(flux_256, tmp_path):
    """The refusal is what diffusers does: Flux's load_lora_weights reads sdnq's packed 4-bit weight
    (1-D) as the layer's shape and raises; the backend names that reason."""
    import advisor
    from advisor.levers.sdnq import SDNQ_BACKEND
    from advisor.testing.lora import write_tiny_lora

    lora = write_tiny_lora(flux_256, tmp_path / "lora")
    pipe = advisor.load_pipeline(flux_256, _sdnq("uint4", "transformer"))
    with pytest.raises(ValueError):
        pipe.load_lora_weights(str(lora))
    problem = SDNQ_BACKEND.lora_problem(
        Quantization(backend="sdnq", weights="uint4", components=["transformer"]), False
    )
    assert "load_lora_weights" in problem[0]


def test_the_planner_does_not_propose_it_without_a_published_speed():
    from advisor.plan.scenario import Request, scenario_for
    from advisor.plan.space import SearchSpace

    scenario = scenario_for(Request(model="flux-dev", gpu="RTX 4090", ram=64 * 2**30, quality="fast"))
    assert not [name for name in SearchSpace.for_scenario(scenario).quantization if "sdnq" in name]
