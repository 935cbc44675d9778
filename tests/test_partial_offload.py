"""Partial offload (``offload.resident_blocks``) applied for real to the tiny Flux, on the CPU.

The tiny Flux at scale 2 has 3 double-stream and 5 single-stream blocks, the double ones larger.
Keeping N resident must keep the N largest, group-offload the rest (the other blocks, and the
modules outside the block lists as one group) through diffusers' hooks, give the image of the
unoffloaded pipeline (on a CPU both devices are the CPU: a transfer is a copy in place, so
bit-exact), and keep exactly the bytes the estimate says stay resident. A CPU has one memory, so
residency is counted by the hooks: a parameter is offloaded when a group of diffusers' group
offloading holds it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from advisor.config import Offload, OptimizationConfig
from advisor.errors import ConfigError
from advisor.levers.offload import block_split, resident_bytes
from advisor.plan.compute import constants
from advisor.plan.weights import weight_bytes
from advisor.probe.models import profile_from_folder
from advisor.run.apply import load_pipeline
from advisor.run.steps import plan
from advisor.testing import build_tiny_flux, tiny_call_kwargs


@pytest.fixture(scope="module")
def flux_x2(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("flux-x2") / "flux", scale=2)


@pytest.fixture(scope="module")
def reference(flux_x2):
    pipe = load_pipeline(flux_x2, OptimizationConfig(device="cpu", dtype="float32"))
    return np.asarray(pipe(**tiny_call_kwargs("image", seed=0)).images)


def partial(count: int) -> OptimizationConfig:
    return OptimizationConfig(
        device="cpu",
        dtype="float32",
        offload=Offload(strategy="group", components=["transformer"], resident_blocks={"transformer": count}),
    )


def offload_groups(module: torch.nn.Module) -> list:
    """The groups of diffusers' group offloading on `module` and its submodules (one per hooked module)."""
    groups = {}
    for m in module.modules():
        registry = getattr(m, "_diffusers_hook", None)
        hook = registry.get_hook("group_offloading") if registry is not None else None
        if hook is not None:
            groups[id(hook.group)] = hook.group
    return list(groups.values())


def offloaded_parameters(module: torch.nn.Module) -> set[int]:
    return {
        id(p) for g in offload_groups(module) for p in [*g.parameters, *(q for m in g.modules for q in m.parameters())]
    }


@pytest.mark.parametrize("count", [1, 3, 6])
def test_a_partly_offloaded_transformer_gives_the_same_image_and_keeps_what_the_estimate_says(
    flux_x2, reference, count
):
    config = partial(count)
    pipe = load_pipeline(flux_x2, config)
    image = np.asarray(pipe(**tiny_call_kwargs("image", seed=0)).images)
    assert np.array_equal(image, reference)

    transformer = pipe.transformer
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    offloaded = offloaded_parameters(transformer)
    # The largest blocks stay whole (the double-stream ones first); every other parameter is offloaded.
    kept = [b for b in blocks if not any(id(p) in offloaded for p in b.parameters())]
    assert sorted(type(b).__name__ for b in kept) == sorted(type(b).__name__ for b in blocks[:count])
    assert all(all(id(p) in offloaded for p in b.parameters()) for b in blocks if b not in kept)

    resident = sum(p.numel() * p.element_size() for p in transformer.parameters() if id(p) not in offloaded)
    profile = profile_from_folder(flux_x2)
    component = next(c for c in profile.components if c.name == "transformer")
    weights = weight_bytes(component, config)
    assert resident == resident_bytes(component, weights, config, active=False, k=constants())
    # Moved per call: everything but the kept blocks, as the estimate's transfer counts it.
    kept_parameters, sizes = block_split(component, config)
    assert len(sizes) == len(blocks) - count
    moved = sum(p.numel() * p.element_size() for p in transformer.parameters() if id(p) in offloaded)
    assert moved == (component.parameters - kept_parameters) * 4


def test_each_streamed_block_is_loaded_once_per_transformer_call(flux_x2, monkeypatch):
    from diffusers.hooks.group_offloading import ModuleGroup

    pipe = load_pipeline(flux_x2, partial(3))
    onloads = []
    original = ModuleGroup.onload_
    monkeypatch.setattr(ModuleGroup, "onload_", lambda self: onloads.append(self) or original(self))
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    pipe(**tiny_call_kwargs("image", seed=0))
    assert len(calls) >= 2  # steps (tiny_call_kwargs) x denoiser calls
    # Per call: the 5 single-stream blocks and the modules outside the blocks; the 3 double-stream ones never move.
    assert len(onloads) == (5 + 1) * len(calls)


def test_the_steps_are_the_code_a_script_runs(flux_x2):
    [step] = [s for s in plan(partial(3), model=flux_x2) if s.description.startswith("partial offload")]
    compile(step.code, "<emitted>", "exec")
    assert "apply_group_offloading(" in step.code and "[:3]" in step.code
    assert {"import torch", "from diffusers.hooks import apply_group_offloading"} <= set(step.imports)


def test_more_resident_blocks_than_the_transformer_has_is_one_line_naming_the_key(flux_x2):
    with pytest.raises(
        ConfigError, match=r"^`offload.resident_blocks.transformer: 8`: transformer \(FluxTransformer2DModel\) has 8 "
    ):
        load_pipeline(flux_x2, partial(8))


@pytest.mark.parametrize(
    ("offload", "message"),
    [
        ({"strategy": "model", "resident_blocks": {"transformer": 2}}, "applies to `strategy: group` only"),
        ({"strategy": "group", "resident_blocks": {"transformer": 0}}, "must be a whole number of blocks >= 1"),
        (
            {"strategy": "group", "offload_type": "leaf_level", "resident_blocks": {"transformer": 2}},
            "needs `offload.offload_type: block_level`",
        ),
        (
            {"strategy": "group", "components": ["vae"], "resident_blocks": {"transformer": 2}},
            "which `offload.components` does not offload",
        ),
    ],
)
def test_invalid_partial_offload_is_refused_naming_the_key(offload, message):
    from advisor.config import config_from_dict

    with pytest.raises(ConfigError, match="resident_blocks") as refused:
        config_from_dict({"schema_version": 1, "offload": offload})
    assert message in str(refused.value) and "\n" not in str(refused.value)
