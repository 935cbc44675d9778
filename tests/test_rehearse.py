"""Issue 28: rehearsing a config on a virtual CUDA device, on this CPU.

Expectations come from physics (bytes = elements x element size; a weight streamed by group
offloading is on the card only while its group runs) and from what CUDA refuses (an op whose
tensors sit on two devices), never from recorded output.
"""

from __future__ import annotations

import gc
import json
import os
import re

import pytest


os.environ["HF_HUB_OFFLINE"] = "1"

torch = pytest.importorskip("torch")

from advisor.config import Offload, OptimizationConfig, Quantization  # noqa: E402
from advisor.levers.code import Step  # noqa: E402
from advisor.rehearse.device import virtual_cuda  # noqa: E402
from advisor.rehearse.virtual import DeviceMismatch, Ledger, NotRehearsable, VirtualTensor  # noqa: E402
from advisor.trace.inputs import Geometry  # noqa: E402


# One denoiser call of the tiny Flux (32x32 pixels: 4x4 latents; 16 text tokens).
TINY = Geometry(batch=1, frames=1, height=4, width=4, text_tokens=16)
STRATEGIES = {
    "none": Offload(),
    "model": Offload(strategy="model"),
    "group": Offload(strategy="group"),
    "group-stream": Offload(strategy="group", use_stream=True),
    "group-leaf-stream": Offload(strategy="group", offload_type="leaf_level", use_stream=True, record_stream=True),
    "sequential": Offload(strategy="sequential"),
}


# --- the virtual device --------------------------------------------------------------------------


def test_an_op_mixing_devices_fails_as_on_a_gpu_and_names_both():
    with virtual_cuda(Ledger()):
        on_card = torch.empty(4, 8, device="cuda")
        in_ram = torch.empty(8, 3)
        with pytest.raises(DeviceMismatch, match=r"mm mixes cpu and cuda:0"):
            on_card @ in_ram
        assert (on_card @ in_ram.to("cuda")).device == torch.device("cuda", 0)
        # A CPU scalar beside a device tensor is fine on CUDA, and here.
        assert (on_card * torch.tensor(2.0)).device.type == "cuda"


def test_an_op_mixing_dtypes_fails_as_its_kernel_would_and_names_them():
    with virtual_cuda(Ledger()):
        activation = torch.empty(4, 8, device="cuda", dtype=torch.bfloat16)
        weight = torch.empty(3, 8, device="cuda", dtype=torch.float32)
        with pytest.raises(DeviceMismatch, match=r"mixes bfloat16 and float32: bfloat16\[4, 8\] on cuda:0"):
            torch.nn.functional.linear(activation, weight)


def test_bytes_are_elements_times_element_size_and_move_with_the_tensor():
    ledger = Ledger()
    with virtual_cuda(ledger):
        weight = torch.nn.Parameter(torch.empty(1000, 100, dtype=torch.bfloat16), requires_grad=False)
        assert ledger.live == {"cpu": 1000 * 100 * 2}
        weight.data = weight.data.to("cuda")  # what diffusers' group offloading does
        assert weight.device == torch.device("cuda", 0)
        gc.collect()
        assert ledger.live == {"cpu": 0, "cuda:0": 200_000}
        view = weight[:10]  # a view: no new bytes
        assert isinstance(view, VirtualTensor) and view.device.type == "cuda"
        pinned = torch.empty(10, dtype=torch.float32).pin_memory()
        assert pinned.is_pinned() and ledger.live["cpu-pinned"] == 40
        del view, weight
        gc.collect()
        assert ledger.live["cuda:0"] == 0 and ledger.peak["cuda:0"] == 200_000


def test_torch_cuda_answers_as_the_card_and_gives_its_answers_back():
    ledger = Ledger()
    available = torch.cuda.is_available()
    with virtual_cuda(ledger, name="NVIDIA GeForce RTX 4090", total_bytes=24 * 2**30):
        assert torch.cuda.is_available() and torch.cuda.get_device_name() == "NVIDIA GeForce RTX 4090"
        torch.empty(2**20, device="cuda")  # freed at once: a temporary
        kept = torch.empty(2**20, device="cuda")
        assert torch.cuda.memory_allocated() == 4 * 2**20
        assert torch.cuda.mem_get_info() == (24 * 2**30 - 4 * 2**20, 24 * 2**30)
        del kept
    assert torch.cuda.is_available() is available


def test_an_op_that_needs_the_values_is_named_not_rehearsable():
    with virtual_cuda(Ledger()):
        x = torch.empty(3, device="cuda")
        with pytest.raises(NotRehearsable, match="needs the tensor's values"):
            x.sum().item()


# --- rehearsing configs on the tiny Flux ---------------------------------------------------------


@pytest.fixture
def tiny_pipe(tiny_flux_dir):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(tiny_flux_dir, dtype=torch.bfloat16)


def _bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_offload_strategy_runs_on_the_virtual_card(tiny_pipe, strategy):
    from advisor.rehearse.rehearsal import rehearse

    result = rehearse(tiny_pipe, OptimizationConfig(device="cuda", offload=STRATEGIES[strategy]), TINY)
    assert result.passed, result.failure or result.not_rehearsed
    assert all(result.device_peak(phase) > 0 for phase in ("text_encoding", "denoising", "vae_decode"))


def test_the_vae_decodes_the_guided_batch_combined(tiny_pipe, tiny_flux_dir):
    # Batched guidance runs the denoiser on cond and uncond latents together, then combines them:
    # the pipeline decodes one set of latents per image, not two (rehearse_planned passes the
    # workload's batch as `decode_batch`). A decoder's activations grow with the batch it decodes.
    from advisor.rehearse.rehearsal import rehearse

    guided = Geometry(batch=2, frames=1, height=4, width=4, text_tokens=16)
    weights = sum(_bytes(c) for c in tiny_pipe.components.values() if isinstance(c, torch.nn.Module))
    one = rehearse(tiny_pipe, OptimizationConfig(device="cuda"), guided, decode_batch=1)
    two = rehearse(_fresh(tiny_pipe), OptimizationConfig(device="cuda"), guided)
    assert one.passed and two.passed
    once, twice = (r.device_peak("vae_decode") - weights for r in (one, two))
    assert 1.5 * once < twice <= 2 * once + 2**20


def test_without_offloading_every_weight_is_on_the_card_from_loading(tiny_pipe):
    from advisor.rehearse.rehearsal import rehearse

    weights = sum(_bytes(c) for c in tiny_pipe.components.values() if isinstance(c, torch.nn.Module))
    result = rehearse(tiny_pipe, OptimizationConfig(device="cuda"), TINY)
    assert result.passed
    # Loaded straight to the card (device_map="cuda"): nothing staged in RAM, every weight byte resident.
    assert result.phase_peaks["loading"] == {"cuda:0": weights}
    for phase in ("text_encoding", "denoising", "vae_decode"):
        assert result.device_peak(phase) > weights  # the weights and the phase's activations


def test_group_offloading_keeps_a_streamed_block_on_the_card_only_while_it_runs(tiny_pipe):
    from advisor.rehearse.rehearsal import rehearse

    transformer = tiny_pipe.transformer
    blocks = [b for name in ("transformer_blocks", "single_transformer_blocks") for b in getattr(transformer, name)]
    outside_blocks = _bytes(transformer) - sum(_bytes(b) for b in blocks)
    largest = max(_bytes(b) for b in blocks)
    everything = OptimizationConfig(device="cuda")
    grouped = OptimizationConfig(device="cuda", offload=Offload(strategy="group"))
    resident = rehearse(tiny_pipe, everything, TINY)
    weights = resident.phase_peaks["loading"]["cuda:0"]
    activations = resident.device_peak("denoising") - weights  # the same call, whatever holds the weights

    from diffusers import DiffusionPipeline

    fresh = DiffusionPipeline.from_pretrained(tiny_pipe.config._name_or_path, dtype=torch.bfloat16)
    streamed = rehearse(fresh, grouped, TINY)
    assert streamed.passed
    # One block group at a time (plus the modules outside the block lists) beside the activations.
    assert largest <= streamed.device_peak("denoising") <= outside_blocks + largest + activations
    assert streamed.phase_peaks["loading"].get("cuda:0", 0) == 0  # loaded into RAM: offloaded from the start


def test_a_misplaced_weight_fails_the_rehearsal_naming_it_and_what_put_it_there(tiny_pipe, monkeypatch):
    """The positive control: the same config passes without the fault."""
    import advisor.rehearse.rehearsal as rehearsal

    config = OptimizationConfig(device="cuda")
    plan = rehearsal.plan

    def misplace(pipe) -> None:
        weight = pipe.transformer.x_embedder.weight
        weight.data = weight.data.to("cpu")

    fault = Step("offload", "leave transformer.x_embedder on the cpu", "", misplace)
    monkeypatch.setattr(rehearsal, "plan", lambda config, pipe: [*plan(config, pipe), fault])
    result = rehearsal.rehearse(tiny_pipe, config, TINY)
    assert not result.passed and result.not_rehearsed is None
    assert "in transformer.x_embedder" in result.failure
    assert "transformer.x_embedder.weight bfloat16[" in result.failure
    assert "on cpu (put there by offload: leave transformer.x_embedder on the cpu)" in result.failure

    monkeypatch.setattr(rehearsal, "plan", plan)
    from diffusers import DiffusionPipeline

    fresh = DiffusionPipeline.from_pretrained(tiny_pipe.config._name_or_path, dtype=torch.bfloat16)
    assert rehearsal.rehearse(fresh, config, TINY).passed


# --- the caching allocator, replaying the rehearsal's allocations --------------------------------


def _fresh(tiny_pipe):
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(tiny_pipe.config._name_or_path, dtype=torch.bfloat16)


def test_the_allocator_runs_out_where_the_live_bytes_exceed_the_budget_and_not_with_room(tiny_pipe):
    from advisor.rehearse.rehearsal import rehearse

    config = OptimizationConfig(device="cuda")
    roomy = rehearse(tiny_pipe, config, TINY)
    allocated = max(roomy.allocator.allocated.values())
    assert roomy.passed and roomy.out_of_memory is None
    assert allocated >= max(p.get("cuda:0", 0) for p in roomy.phase_peaks.values())  # rounded up to 512 B
    # Reserved covers allocated; what the run needs lies between its allocated peak and that reserve.
    assert allocated <= roomy.needs_bytes <= max(roomy.allocator.reserved.values())
    # Half the live bytes can't be held however the cache is emptied: out of memory, and not passed.
    tight = rehearse(_fresh(tiny_pipe), config, TINY, budget_bytes=allocated // 2)
    assert tight.failure is None and tight.not_rehearsed is None
    assert not tight.passed and "out of memory" in tight.out_of_memory


def test_model_offload_empties_the_cache_as_it_moves_a_model_off_and_group_offload_never_does(tiny_pipe):
    # accelerate's CpuOffload.pre_forward calls clear_device_cache() after offloading the previous
    # model (accelerate/hooks.py); diffusers' group-offloading hooks never call empty_cache.
    from advisor.plan.allocator import EMPTY_CACHE
    from advisor.rehearse.rehearsal import rehearse

    def emptied(strategy: str) -> set[str]:
        result = rehearse(_fresh(tiny_pipe), OptimizationConfig(device="cuda", offload=STRATEGIES[strategy]), TINY)
        assert result.passed
        return {e.phase for e in result.ledger.events if e.block == EMPTY_CACHE}

    assert {"denoising", "vae_decode"} <= emptied("model")
    assert emptied("group-stream") == set()


def test_group_offloading_on_a_stream_onloads_the_blocks_from_that_streams_pool(tiny_pipe):
    # Under `torch.cuda.stream(s)` (diffusers' ModuleGroup.onload_) the allocator serves s's own pool:
    # each denoiser call onloads every repeated block's bytes on the side stream; the activations
    # (and the modules outside the block lists, onloaded without prefetching) come from the default one.
    from advisor.rehearse.rehearsal import rehearse

    transformer = tiny_pipe.transformer
    blocks = sum(
        _bytes(b) for n in ("transformer_blocks", "single_transformer_blocks") for b in getattr(transformer, n)
    )
    result = rehearse(tiny_pipe, OptimizationConfig(device="cuda", offload=STRATEGIES["group-stream"]), TINY)
    denoising = [e for e in result.ledger.events if e.pool == "cuda:0" and e.bytes > 0 and e.phase == "denoising"]
    assert sum(e.bytes for e in denoising if e.stream) == 2 * blocks  # two steps, one call each
    assert any(e.stream == 0 for e in denoising)


# --- load-time quantization, rehearsed with the backends' own code --------------------------------

NF4 = Quantization(backend="bitsandbytes_4bit", components=["transformer"])


def test_nf4_weights_take_half_a_byte_each_plus_a_float32_scale_per_64(tiny_pipe):
    import bitsandbytes as bnb

    from advisor.rehearse.rehearsal import rehearse

    result = rehearse(tiny_pipe, OptimizationConfig(device="cuda", quantization=NF4), TINY)
    assert result.passed, result.failure or result.not_rehearsed
    layers = [m for m in tiny_pipe.transformer.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers  # bitsandbytes' replace_with_bnb_linear swapped them, as from_pretrained does
    for layer in layers:
        weights = layer.in_features * layer.out_features
        assert layer.weight.device.type == "cuda" and layer.weight.quant_state.absmax.device.type == "cuda"
        assert layer.weight.block.nbytes == weights // 2  # two 4-bit codes per byte
        assert layer.weight.quant_state.absmax.block.nbytes == 4 * (-(-weights // 64))  # bnb's default blocksize


def test_a_misplaced_quantization_state_fails_the_rehearsal_naming_it(tiny_pipe, monkeypatch):
    import advisor.rehearse.rehearsal as rehearsal

    # Nothing offloaded: no hook moves the layer back (model offload's `.to()` would carry the state along).
    config = OptimizationConfig(device="cuda", quantization=NF4)
    plan = rehearsal.plan

    def misplace(pipe) -> None:
        state = pipe.transformer.x_embedder.weight.quant_state
        state.absmax = state.absmax.to("cpu")

    fault = Step("offload", "leave one quantization state on the cpu", "", misplace)
    monkeypatch.setattr(rehearsal, "plan", lambda config, pipe: [*plan(config, pipe), fault])
    result = rehearsal.rehearse(tiny_pipe, config, TINY)
    assert "transformer.x_embedder.weight.quant_state.absmax float32[" in result.failure
    assert "on cpu (put there by offload: leave one quantization state on the cpu)" in result.failure

    monkeypatch.setattr(rehearsal, "plan", plan)
    from diffusers import DiffusionPipeline

    fresh = DiffusionPipeline.from_pretrained(tiny_pipe.config._name_or_path, dtype=torch.bfloat16)
    assert rehearsal.rehearse(fresh, config, TINY).passed


@pytest.mark.parametrize("component", ["transformer", "text_encoder_2"])
@pytest.mark.parametrize("backend", ["bitsandbytes_4bit", "bitsandbytes_8bit"])
def test_group_offloading_a_bitsandbytes_model_leaves_its_scales_on_the_cpu(tiny_flux_dir, component, backend):
    """The class of diffusers #10797 (group offloading + a bitsandbytes-4bit text encoder: device
    mismatch). diffusers moves `param.data`; bitsandbytes keeps the scales beside it (read in
    hooks/group_offloading.py and bitsandbytes/nn/modules.py). With streams, leaf by leaf, the
    module is never moved to the CPU and the scales stay on the card. The refusal follows."""
    from diffusers import DiffusionPipeline

    from advisor.levers.bitsandbytes import bitsandbytes_group_offload_needs_leaf_streams
    from advisor.platform import Platform
    from advisor.rehearse.rehearsal import rehearse

    quantization = Quantization(backend=backend, components=[component])
    by_block = OptimizationConfig(device="cuda", quantization=quantization, offload=Offload(strategy="group"))
    by_leaf = OptimizationConfig(
        device="cuda",
        quantization=quantization,
        offload=Offload(strategy="group", offload_type="leaf_level", use_stream=True),
    )
    gpu = Platform.of_target("cuda", "8.9", {"diffusers": "0.42.1", "bitsandbytes": "0.50.2"})
    results = {}
    for name, config in (("block", by_block), ("leaf", by_leaf)):
        pipe = DiffusionPipeline.from_pretrained(tiny_flux_dir, dtype=torch.bfloat16)
        results[name] = rehearse(pipe, config, TINY)
    if backend == "bitsandbytes_8bit" and component == "text_encoder_2":
        # transformers' 8-bit layers keep their scales in the weight (Int8Params.SCB), which moves with it.
        assert results["block"].passed
        return
    assert results["block"].failure is not None
    assert "mixes cpu and cuda:0" in results["block"].failure and f"in {component}." in results["block"].failure
    # The scales are what sits on the CPU: the 4-bit weight's quant_state, the 8-bit layer's state.
    assert re.search(r"\.(quant_state\.absmax|state\.CB) [^;]* on cpu", results["block"].failure)
    assert results["leaf"].passed, results["leaf"].failure
    assert bitsandbytes_group_offload_needs_leaf_streams(by_block, gpu) is not None
    assert bitsandbytes_group_offload_needs_leaf_streams(by_leaf, gpu) is None


def test_4bit_models_group_offloaded_load_on_the_host_and_reach_the_card_one_at_a_time(tiny_pipe):
    """bitsandbytes quantizes straight onto the GPU when loading with no map, so every 4-bit model
    would be there at once before the offloading starts. Loaded onto the host instead, each is moved
    to the card whole (``Params4bit.to`` carries its quant_state) right before group offloading
    moves its weights' data back: the scales stay on the card and the models come one at a time."""
    import bitsandbytes as bnb

    from advisor.levers.offload import load_device_map
    from advisor.rehearse.rehearsal import APPLYING, rehearse

    both = Quantization(backend="bitsandbytes_4bit", components=["transformer", "text_encoder_2"])
    leaf = Offload(strategy="group", offload_type="leaf_level", use_stream=True, record_stream=True)
    config = OptimizationConfig(device="cuda", quantization=both, offload=leaf)
    assert load_device_map(config) == "cpu"
    result = rehearse(tiny_pipe, config, TINY)
    assert result.passed, result.failure or result.not_rehearsed
    for name in both.components:  # computed with every scale on the card
        layers = [m for m in getattr(tiny_pipe, name).modules() if isinstance(m, bnb.nn.Linear4bit)]
        assert layers and all(layer.weight.quant_state.absmax.device.type == "cuda" for layer in layers)
    sizes = {name: _bytes(getattr(tiny_pipe, name)) for name in both.components}  # packed 4-bit data
    assert result.phase_peaks["loading"].get("cuda:0", 0) == 0
    assert max(sizes.values()) <= result.device_peak(APPLYING) < sum(sizes.values())


def test_group_offloading_leaves_a_4bit_models_scales_and_an_8bit_models_weights_on_the_card(tiny_flux_dir):
    """Group offloading swaps each parameter's data. What a bitsandbytes layer keeps beside it stays:
    a 4-bit layer's quant_state (absmax and code), and an 8-bit layer's int8 data itself, which
    `Int8Params` also holds as `CB` (with its `SCB`). So while the VAE decodes, long after the
    transformer ran, the card holds exactly those bytes more than with a bf16 transformer."""
    import bitsandbytes as bnb
    from diffusers import DiffusionPipeline

    from advisor.rehearse.rehearsal import rehearse

    leaf = Offload(strategy="group", offload_type="leaf_level", use_stream=True, record_stream=True)
    left, decode = {}, {}
    for backend in (None, "bitsandbytes_4bit", "bitsandbytes_8bit"):
        quantization = Quantization(backend=backend, components=["transformer"]) if backend else None
        pipe = DiffusionPipeline.from_pretrained(tiny_flux_dir, dtype=torch.bfloat16)
        result = rehearse(pipe, OptimizationConfig(device="cuda", quantization=quantization, offload=leaf), TINY)
        assert result.passed, result.failure or result.not_rehearsed
        decode[backend] = result.device_peak("vae_decode")
        layers = [m for m in pipe.transformer.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
        if backend == "bitsandbytes_4bit":
            states = [layer.weight.quant_state for layer in layers]
            left[backend] = sum(state.absmax.nbytes + state.code.nbytes for state in states)
        elif backend == "bitsandbytes_8bit":
            scales = [layer.weight.SCB if layer.weight.SCB is not None else layer.state.SCB for layer in layers]
            left[backend] = sum(layer.weight.numel() for layer in layers) + sum(scale.nbytes for scale in scales)
    for backend, stays in left.items():
        assert stays > 0 and decode[backend] - decode[None] == stays, backend


def test_model_offload_moves_a_4bit_model_off_the_card_but_no_byte_of_an_8bit_one(tiny_flux_dir):
    """accelerate's model offload moves a model with ``Module.to``, which swaps each parameter's data.
    An 8-bit layer's int8 data is also held as ``CB`` (then ``state.CB``), so once the run is over,
    the transformer back on the CPU, the card still holds every 8-bit byte: why the advisor refuses
    8-bit with model or group offloading (constraint bitsandbytes-8bit-stays-on-the-card)."""
    import bitsandbytes as bnb
    from diffusers import DiffusionPipeline

    from advisor.levers.bitsandbytes import bitsandbytes_8bit_stays_on_the_card
    from advisor.platform import Platform
    from advisor.rehearse.rehearsal import rehearse

    gpu = Platform.of_target("cuda", "8.9", {"diffusers": "0.42.1", "bitsandbytes": "0.50.2"})
    left = {}
    for backend in ("bitsandbytes_4bit", "bitsandbytes_8bit"):
        config = OptimizationConfig(
            device="cuda",
            quantization=Quantization(backend=backend, components=["transformer"]),
            offload=Offload(strategy="model"),
        )
        pipe = DiffusionPipeline.from_pretrained(tiny_flux_dir, dtype=torch.bfloat16)
        result = rehearse(pipe, config, TINY)
        assert result.passed, result.failure or result.not_rehearsed
        gc.collect()
        assert pipe.transformer.device.type == "cpu"
        left[backend] = result.ledger.live.get("cuda:0", 0)
        refused = bitsandbytes_8bit_stays_on_the_card(config, gpu)
        assert (refused is not None) == (backend == "bitsandbytes_8bit")
    layers = [m for m in pipe.transformer.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    int8 = sum(layer.state.CB.nbytes + layer.state.SCB.nbytes for layer in layers)
    assert left == {"bitsandbytes_4bit": 0, "bitsandbytes_8bit": int8}


def test_an_8bit_model_moved_by_to_leaves_its_scales_behind_so_it_loads_on_the_card(tiny_pipe, monkeypatch):
    """``nn.Module._apply`` swaps an ``Int8Params``' data but keeps the parameter object, whose
    ``CB``/``SCB`` stay where they were; `Linear8bitLt.to` moves the layer's state only when called on
    the layer itself. Loaded on the host and moved with model offload's ``.to``, an 8-bit T5 computes
    with its scales on the CPU: so 8-bit models load with no map, onto the card."""
    from advisor.levers import bitsandbytes
    from advisor.levers.offload import load_device_map
    from advisor.rehearse.rehearsal import rehearse

    eight = Quantization(backend="bitsandbytes_8bit", components=["text_encoder_2"])
    config = OptimizationConfig(device="cuda", quantization=eight, offload=Offload(strategy="model"))
    assert load_device_map(config) is None
    assert rehearse(tiny_pipe, config, TINY).passed
    monkeypatch.setattr(bitsandbytes.Bitsandbytes, "scales_move_with_module", lambda self, q: True)
    assert load_device_map(config) == "cpu"
    failure = rehearse(_fresh(tiny_pipe), config, TINY).failure
    assert failure is not None and re.search(r"text_encoder_2\.\S*\.state\.(CB|SCB) \S+ on cpu", failure)


# --- advisor check ---------------------------------------------------------------------------------


def _config_file(tmp_path, config: OptimizationConfig, model: str) -> str:
    from advisor.config import Provenance

    path = tmp_path / "advisor.json"
    path.write_text(config.replace(provenance=Provenance(model=model)).to_json())
    return str(path)


def test_check_rehearses_a_config_and_prints_each_phase_beside_the_estimate(tiny_flux_dir, tmp_path, capsys):
    from advisor.cli import main

    config = OptimizationConfig(device="cuda", quantization=NF4, offload=Offload(strategy="model"))
    path = _config_file(tmp_path, config, str(tiny_flux_dir))
    assert main(["check", path, "--vram", "8GB", "--height", "32", "--width", "32"]) == 0
    out = capsys.readouterr().out
    for phase in ("loading", "applying the config", "text encoding", "denoising", "vae decode"):
        assert phase in out
    assert "rehearsed: no op mixed devices or dtypes" in out
    assert "the run needs" in out

    assert main(["check", path, "--vram", "8GB", "--height", "32", "--width", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and report["failure"] is None and report["not_rehearsed"] is None
    assert report["phases"]["denoising"]["device_bytes"] > 0
    assert report["phases"]["denoising"]["estimated_device_bytes"] > 0
    denoising = report["phases"]["denoising"]
    assert denoising["reserved_bytes"] >= denoising["device_bytes"]  # segments hold the blocks
    assert report["needs_bytes"] >= max(p["device_bytes"] for p in report["phases"].values())


def test_check_fails_a_config_the_card_would_refuse_in_one_line_with_exit_4(tiny_flux_dir, tmp_path, capsys):
    from advisor.cli import main
    from advisor.cli.check import WOULD_FAIL_EXIT

    # Written by hand: recommend never offers it (constraint bitsandbytes-group-offload-needs-leaf-streams).
    config = OptimizationConfig(device="cuda", quantization=NF4, offload=Offload(strategy="group"))
    path = _config_file(tmp_path, config, str(tiny_flux_dir))
    assert main(["check", path, "--vram", "8GB", "--height", "32", "--width", "32"]) == WOULD_FAIL_EXIT
    verdict = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WOULD FAIL")]
    assert len(verdict) == 1 and "quant_state.absmax" in verdict[0] and "on cpu" in verdict[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["check"], "CONFIG"),
        (["check", "missing.json", "--vram", "8GB"], "missing.json"),
    ],
)
def test_check_bad_input_is_one_line(args, message, capsys):
    from advisor.cli import main

    assert main(args) in (1, 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("advisor: error:") and message in err[0]


def test_check_refuses_a_cpu_config_and_a_config_without_a_model(tmp_path, capsys):
    from advisor.cli import main

    cpu = tmp_path / "cpu.json"
    cpu.write_text(OptimizationConfig(device="cpu").to_json())
    assert main(["check", str(cpu), "-m", "flux-dev", "--vram", "8GB"]) == 2
    assert "check rehearses GPU configs" in capsys.readouterr().err
    nameless = tmp_path / "nameless.json"
    nameless.write_text(OptimizationConfig(device="cuda").to_json())
    assert main(["check", str(nameless), "--vram", "8GB"]) == 2
    assert "--model" in capsys.readouterr().err


def test_block_level_group_offloading_strands_a_vae_whose_decode_is_not_its_forward(tmp_path):
    """diffusers hooks block-level group offloading on a module's forward; `vae.decode` is not the
    VAE's forward, so only VAE classes listing `_group_offload_block_modules` onload for it. LTX's
    does not (the class of diffusers #11086): offloading it fails at the first decode convolution,
    and the advisor's block-level choices keep such a VAE on the device instead."""
    from diffusers import DiffusionPipeline

    from advisor.levers.offload import OFFLOAD
    from advisor.probe.models import profile_from_catalog
    from advisor.rehearse.rehearsal import rehearse
    from advisor.testing import build_tiny_for

    folder = build_tiny_for("Lightricks/LTX-Video", tmp_path / "ltx")
    geometry = Geometry(batch=2, frames=2, height=8, width=8, text_tokens=16)
    everything = OptimizationConfig(device="cuda", offload=Offload(strategy="group", use_stream=True))
    stranded = rehearse(DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16), everything, geometry)
    assert stranded.failure is not None and "in vae.decoder" in stranded.failure
    assert re.search(r"vae\.decoder\.\S+\.weight [^;]* on cpu", stranded.failure)
    # Written by hand, it is refused before it runs: the installed VAE class is asked.
    from advisor.errors import ConfigError
    from advisor.run.checks import check_pipeline

    with pytest.raises(ConfigError, match="lists no `_group_offload_block_modules`"):
        check_pipeline(DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16), everything)

    choices = OFFLOAD.choices_for(profile_from_catalog("Lightricks/LTX-Video"), "cuda")
    block_level = [o for o in choices.values() if o.strategy == "group" and o.offload_type == "block_level"]
    assert block_level and all(o.components is not None and "vae" not in o.components for o in block_level)
    planned = OptimizationConfig(device="cuda", offload=block_level[0])
    result = rehearse(DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16), planned, geometry)
    assert result.passed, result.failure or result.not_rehearsed


def test_partial_offload_never_puts_the_whole_denoiser_on_the_card_while_it_is_applied(tiny_pipe):
    """diffusers' `enable_group_offload(exclude_modules=[...])` moves an excluded module onto the
    device whole; partial offload must name the others instead, or a bf16 denoiser that only fits
    in part is on the card in full before its blocks are offloaded (rehearsed: 22.2 GB of FLUX.1-dev)."""
    from advisor.rehearse.rehearsal import APPLYING, rehearse

    transformer = _bytes(tiny_pipe.transformer)
    partial = Offload(strategy="group", use_stream=True, record_stream=True, resident_blocks={"transformer": 1})
    result = rehearse(tiny_pipe, OptimizationConfig(device="cuda", offload=partial), TINY)
    assert result.passed, result.failure
    assert result.phase_peaks[APPLYING].get("cuda:0", 0) < transformer


@pytest.mark.parametrize(
    "model, config",
    [
        # #11086: apply_group_offloading on Wan, "Input type (cuda) and weight type (cpu)" at the VAE.
        # diffusers since lists `_group_offload_block_modules` on AutoencoderKLWan, so decode onloads.
        ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", OptimizationConfig(device="cuda", offload=Offload(strategy="group"))),
        # #13281: torchao + group offloading with use_stream=True, a device mismatch on Qwen-Image. The
        # installed group offloading moves torchao tensors by swapping their inner tensors and records
        # their streams (`_swap_torchao_tensor`, `_record_stream_torchao_tensor` in hooks/group_offloading.py).
        (
            "Qwen/Qwen-Image",
            OptimizationConfig(
                device="cuda",
                quantization=Quantization(backend="torchao", scheme="int8_weight_only", components=["transformer"]),
                offload=Offload(strategy="group", use_stream=True, record_stream=True, components=["transformer"]),
            ),
        ),
    ],
    ids=["wan-group-offload-11086", "qwen-image-torchao-streams-13281"],
)
def test_reported_device_mismatches_the_installed_diffusers_fixed_rehearse_clean(tmp_path, model, config):
    from diffusers import DiffusionPipeline

    from advisor.probe.models import load_profile
    from advisor.probe.workload import Workload
    from advisor.rehearse.build import rehearsal_geometry
    from advisor.rehearse.rehearsal import rehearse
    from advisor.testing import build_tiny_for, tiny_call_kwargs

    folder = build_tiny_for(model, tmp_path / "tiny")
    profile = load_profile(str(folder))
    call = tiny_call_kwargs(profile.pipeline_class)
    geometry, tokens, calls, passes = rehearsal_geometry(
        profile, Workload(profile.workload, call["height"], call["width"], call.get("num_frames") or 1, steps=2)
    )
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    result = rehearse(pipe, config, geometry, text_tokens=tokens, calls_per_step=calls, prompt_passes=passes)
    assert result.passed, result.failure or result.not_rehearsed


def test_text_encoders_run_one_prompt_at_a_time_whatever_the_denoiser_batch(tiny_pipe):
    """Batched guidance doubles the denoiser's batch, not the encoders': pipelines encode the prompt
    and the negative prompt apart and repeat the embeddings afterwards."""
    from advisor.rehearse.rehearsal import rehearse

    batches = []
    tiny_pipe.text_encoder_2.register_forward_pre_hook(
        lambda _module, _args, kwargs: batches.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    guided = Geometry(batch=2, frames=1, height=4, width=4, text_tokens=16)
    assert rehearse(tiny_pipe, OptimizationConfig(device="cuda"), guided).passed
    assert batches == [1]
