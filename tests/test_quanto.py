"""quanto (issue 30): the blog's quanto rows are expressible, and a config that names it loads and runs."""

from __future__ import annotations

import numpy as np
import pytest

from advisor.config import OptimizationConfig, Quantization


@pytest.mark.parametrize("weights", ["float8", "int8"])  # int4 runs too, after compiling its kernels (~25 s here)
def test_load_pipeline_quantizes_with_quanto_and_runs(tiny_flux_dir, weights):
    from optimum.quanto import QLinear

    import advisor
    from advisor.testing import tiny_call_kwargs

    config = OptimizationConfig(  # float32: int8 with bf16 crashes on the CPU (the constraint below)
        device="cpu",
        dtype="float32",
        quantization=Quantization(backend="quanto", weights=weights, components=["transformer"]),
    )
    pipe = advisor.load_pipeline(tiny_flux_dir, config)
    assert isinstance(pipe.transformer.transformer_blocks[0].attn.to_q, QLinear)
    image = pipe(**tiny_call_kwargs("image", seed=0)).images[0]
    assert np.isfinite(np.asarray(image, dtype=np.float32)).all()


def test_the_script_maps_each_component_to_its_librarys_quanto_config(tiny_flux_dir):
    """diffusers' QuantoConfig takes weights_dtype, transformers' weights: quant_backend="quanto" is
    refused ("signatures ... don't match"), so each component gets its own library's."""
    from advisor.run.emit import emit_python

    q = Quantization(backend="quanto", weights="int4", components=["transformer", "text_encoder_2"])
    script = emit_python(str(tiny_flux_dir), OptimizationConfig(device="cpu", quantization=q))
    assert '"transformer": QuantoConfig(weights_dtype="int4")' in script
    assert '"text_encoder_2": TransformersQuantoConfig(weights="int4")' in script


def test_the_planner_never_proposes_a_backend_diffusers_deprecates():
    """diffusers 0.42: "`QuantoConfig` is deprecated and will be removed in version 1.0.0"."""
    from advisor.plan.scenario import Request, scenario_for
    from advisor.plan.space import SearchSpace

    scenario = scenario_for(Request(model="flux-dev", gpu="RTX 4090", ram=64 * 2**30, quality="fast"))
    assert not [name for name in SearchSpace.for_scenario(scenario).quantization if "quanto" in name]


CRASH = """
import sys
import torch
from diffusers import DiffusionPipeline, QuantoConfig
from diffusers.quantizers import PipelineQuantizationConfig
from advisor.testing import tiny_call_kwargs
q = PipelineQuantizationConfig(quant_mapping={"transformer": QuantoConfig(weights_dtype="int8")})
pipe = DiffusionPipeline.from_pretrained(sys.argv[1], quantization_config=q, dtype=torch.bfloat16)
pipe(**tiny_call_kwargs("image", seed=0))
"""


def test_quanto_int8_with_bf16_on_the_cpu_crashes_as_its_constraint_says(tiny_flux_dir):
    """The evidence of `quanto-int8-bf16-not-on-cpu`: a segmentation fault in optimum-quanto's CPU int8
    matmul on bf16 activations. A release that fixes it fails this test, and the constraint can go."""
    import os
    import signal
    import subprocess
    import sys

    from advisor.constraints import Platform, first_violation

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", CRASH, str(tiny_flux_dir)], capture_output=True, env=env, timeout=600)
    assert run.returncode == -signal.SIGSEGV, run.stderr[-2000:]
    int8 = OptimizationConfig(device="cpu", quantization=Quantization(backend="quanto", components=["transformer"]))
    assert first_violation(int8, Platform.anywhere()).constraint.name == "quanto-int8-bf16-not-on-cpu"
    assert first_violation(int8.replace(dtype="float32"), Platform.anywhere()) is None
    assert first_violation(int8.replace(device="cuda"), Platform.anywhere()) is None
