"""Plans over several GPUs: the target's cards and link, context parallelism and one pipeline per GPU.

Expectations come from diffusers' code (which models and attention backends split, what the sharder
asserts), from the cards' datasheets and driver facts (NVLink, no peer access on GeForce RTX 40), and
from published multi-GPU timings (each cited where it is used).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

from advisor.config import Compile, ContextParallel, Offload, OptimizationConfig, Replicas
from advisor.errors import UsageError
from advisor.levers.multi_gpu.context_parallel import CONTEXT_PARALLEL, link_bytes
from advisor.plan.estimate import estimate
from advisor.plan.recommend import recommend
from advisor.plan.scenario import Request, scenario_for
from advisor.probe.hardware import GpuInfo, MachineProfile
from advisor.probe.interconnect import joined_gpus, split_gpu_count
from advisor.probe.models import load_profile
from advisor.probe.target import planned_target, target_from_probe
from advisor.probe.workload import make_workload
from advisor.units import GIB


FLUX = "black-forest-labs/FLUX.1-dev"
WAN_14B = "Wan-AI/Wan2.1-T2V-14B-Diffusers"


# --- the cards and their link ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2x RTX 4090", (2, "RTX 4090")),
        ("8 x H100", (8, "H100")),
        ("4×A100", (4, "A100")),
        ("RTX 4090", (1, "RTX 4090")),
    ],
)
def test_a_count_before_the_card_names_several(text, expected):
    assert split_gpu_count(text) == expected


@pytest.mark.parametrize("text", ["0x RTX 4090", "65x H100"])
def test_a_count_out_of_range_is_one_line_naming_the_flag(text):
    with pytest.raises(UsageError, match=r"^--gpu: .* give 1 to 64"):
        split_gpu_count(text)


def test_repeated_gpu_flags_add_up_and_different_cards_are_refused():
    assert joined_gpus(["RTX 4090", "rtx 4090"]) == "2x RTX 4090"
    assert joined_gpus(["2x H100", "H100"]) == "3x H100"
    assert joined_gpus(["RTX 3060"]) == "RTX 3060"
    with pytest.raises(UsageError, match="^--gpu: 'RTX 4090' and 'RTX 3090' are different cards"):
        joined_gpus(["RTX 4090", "RTX 3090"])


def test_geforce_rtx_40_cards_talk_through_host_memory():
    # NVIDIA's driver gives GeForce RTX 40 cards no peer-to-peer access (forum thread 233202): two
    # RTX 4090s copy through host memory at about 22 GB/s one way (nccl#814).
    target = planned_target(machine=None, gpu="2x RTX 4090")
    assert (target.gpu_count, target.link.kind) == (2, "host")
    assert 18e9 < target.link.bytes_per_s < 24e9
    assert any(line.startswith("link: PCIe through host memory") for line in target.assumptions)
    assert target.cards == "2x RTX 4090"


def test_sxm_cards_talk_over_nvlink_and_a_bridge_is_not_assumed():
    h100 = planned_target(machine=None, gpu="8x H100")
    assert h100.link.kind == "nvlink"  # 900 GB/s both ways on an HGX H100 board
    assert 300e9 < h100.link.bytes_per_s <= 450e9
    rtx3090 = planned_target(machine=None, gpu="2x RTX 3090")  # PCIe 4.0 x16 with peer access; bridge optional
    assert rtx3090.link.kind == "pcie-p2p"
    assert 20e9 < rtx3090.link.bytes_per_s < 31.5e9
    assert any("no NVLink bridge assumed" in line for line in rtx3090.assumptions)
    # host RAM assumed for the machine grows with its cards
    assert rtx3090.ram_total_bytes == 2 * 2 * rtx3090.vram_total_bytes


def _gpu(index: int, name: str = "NVIDIA GeForce RTX 3090", **link) -> GpuInfo:
    memory = 24 * GIB
    return GpuInfo(index, name, memory, memory, 0, "8.6", 4, 16, 4, 16, 31_500_000_000, **link)


def _machine(gpus: list[GpuInfo]) -> MachineProfile:
    host = SimpleNamespace(ram_total_bytes=128 * GIB, ram_available_bytes=120 * GIB, cpu_model="x", cpu_bf16=False)
    return MachineProfile(gpus, "nvml", "", host, SimpleNamespace(packages={}))


def test_the_probe_counts_the_cards_like_the_first_and_reads_their_link():
    peers = _machine([_gpu(0, peers=[1]), _gpu(1, peers=[0]), _gpu(2, "NVIDIA GeForce RTX 3060")])
    target = target_from_probe(peers)
    assert (target.gpu_count, target.link.kind) == (2, "pcie-p2p")  # the RTX 3060 is not one of them
    assert target.link.source.startswith("NVML")
    no_peers = target_from_probe(_machine([_gpu(0, peers=[]), _gpu(1, peers=[])]))
    assert no_peers.link.kind == "host"
    bridged = target_from_probe(_machine([_gpu(0, nvlinks_active=4, peers=[1]), _gpu(1, nvlinks_active=4, peers=[0])]))
    assert bridged.link.kind == "nvlink"  # an RTX 3090 pair with its bridge: 56.25 GB/s per direction
    assert bridged.link.bytes_per_s == pytest.approx(56.25e9 * 0.8)
    assert target_from_probe(_machine([_gpu(0)])).link is None
    # torchrun's LOCAL_RANK and device_map="balanced" take the visible GPUs in order: a 3060 between
    # two 3090s leaves one 3090 at the front
    mixed = target_from_probe(_machine([_gpu(0, peers=[2]), _gpu(1, "NVIDIA GeForce RTX 3060"), _gpu(2, peers=[0])]))
    assert (mixed.gpu_count, mixed.link) == (1, None)
    # NVML without PCIe readings (or peer status): the datasheet's link, through host memory
    unread = [GpuInfo(i, "NVIDIA GeForce RTX 3090", 24 * GIB, 24 * GIB, 0, "8.6", peers=None) for i in range(2)]
    link = target_from_probe(_machine(unread)).link
    assert link.kind == "host" and link.bytes_per_s > 15e9 and "datasheet" in link.source


# --- context parallelism --------------------------------------------------------------------------


def _scenario(model: str, gpu: str, **request):
    return scenario_for(Request(model, gpu=gpu, **request))


def test_context_parallel_is_offered_for_models_diffusers_can_split():
    flux = CONTEXT_PARALLEL.choices(_scenario(FLUX, "2x RTX 4090"), "bfloat16")
    assert flux == {"none": None, "ulysses-2": ContextParallel(degree=2, kind="ulysses")}
    # Wan 2.1 1.3B has 12 heads: Ulysses needs them to divide by the degree, ring does not
    wan = CONTEXT_PARALLEL.choices(_scenario("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "8x H100"), "bfloat16")
    assert set(wan) == {"none", "ulysses-2", "ulysses-4", "ring-8"}
    # SD3's and HunyuanVideo's transformers define no _cp_plan: enable_parallelism can't split them
    for model in ("stabilityai/stable-diffusion-3-medium-diffusers", "hunyuanvideo-community/HunyuanVideo"):
        assert CONTEXT_PARALLEL.choices(_scenario(model, "2x H100"), "bfloat16") == {"none": None}
    assert CONTEXT_PARALLEL.choices(_scenario(FLUX, "H100"), "bfloat16") == {"none": None}


def _refusals(config: OptimizationConfig, scenario) -> list[str]:
    return [f.name for f in CONTEXT_PARALLEL.filters if f.check(config, scenario)]


def test_what_context_parallelism_is_never_combined_with():
    ulysses = OptimizationConfig(context_parallel=ContextParallel(degree=2))
    scenario = _scenario(FLUX, "2x H100")
    assert _refusals(ulysses, scenario) == []
    # 1008x1008: 63x63 latent tokens do not divide by 2 (the guide's 1008x1008 runs failed)
    assert _refusals(ulysses, _scenario(FLUX, "2x H100", height=1008, width=1008)) == [
        "context-parallel-sequence-divides"
    ]
    ring = OptimizationConfig(context_parallel=ContextParallel(degree=2, kind="ring"))
    assert _refusals(ring, scenario) == ["context-parallel-attention-backend"]  # native returns no log-sum-exp
    assert _refusals(ring.replace(attention_backend="_native_cudnn"), scenario) == []
    assert _refusals(ulysses.replace(attention_backend="xformers"), scenario) == ["context-parallel-attention-backend"]
    assert _refusals(ulysses.replace(offload=Offload(strategy="model")), scenario) == [
        "context-parallel-without-offload"
    ]


def _seconds(model: str, gpu: str, gpus: int, job: dict, *, compiled: bool = False) -> float:
    profile = load_profile(model)
    workload = make_workload(profile, **job)
    target = planned_target(machine=None, gpu=f"{gpus}x {gpu}" if gpus > 1 else gpu)
    split = ContextParallel(degree=gpus) if gpus > 1 else None
    config = OptimizationConfig(context_parallel=split, compile=Compile() if compiled else None)
    return estimate(profile, workload, config, target).latency_s


@pytest.mark.parametrize(
    ("model", "gpu", "job", "compiled", "published"),
    [
        # cache-dit's benchmark, NVIDIA L20 (PCIe), FLUX.1-dev 1024x1024, 28 steps: 23.25 s on one GPU,
        # Ulysses over 2 13.87 s, over 4 8.22 s (docs/benchmark/NVIDIA_GPU.md; vipshop/cache-dit#754)
        (FLUX, "L20", {"steps": 28}, False, {1: 23.25, 2: 13.87, 4: 8.22}),
        # xDiT, H100 with NVLink, FLUX.1-dev 1024x1024, 28 steps, compiled: 4.30 / 2.68 / 1.63 s
        (FLUX, "H100", {"steps": 28}, True, {1: 4.30, 2: 2.68, 4: 1.63}),
        # Wan 2.1 T2V 14B 720p, 81 frames, 50 steps on H100s (Wan's README): 1837.9 / 945.1 / 497.0 s
        (
            WAN_14B,
            "H100",
            {"width": 1280, "height": 720, "frames": 81, "steps": 50},
            False,
            {1: 1837.9, 2: 945.1, 4: 497.0},
        ),
    ],
)
def test_predicted_speed_up_follows_published_runs(model, gpu, job, compiled, published):
    one = _seconds(model, gpu, 1, job, compiled=compiled)
    for gpus, seconds in published.items():
        if gpus > 1:
            predicted = one / _seconds(model, gpu, gpus, job, compiled=compiled)
            assert predicted == pytest.approx(published[1] / seconds, rel=0.15), gpus


def test_each_gpu_holds_the_whole_pipeline_and_its_share_of_the_activations():
    profile = load_profile(WAN_14B)
    workload = make_workload(profile, width=1280, height=720, frames=81)
    target = planned_target(machine=None, gpu="4x H100")
    one = estimate(profile, workload, OptimizationConfig(), target)
    split = estimate(profile, workload, OptimizationConfig(context_parallel=ContextParallel(degree=4)), target)
    phase = {p.name: p for p in one.phases}["denoising"]
    split_phase = {p.name: p for p in split.phases}["denoising"]
    assert split_phase.weights_bytes == phase.weights_bytes
    assert split_phase.activation_bytes == pytest.approx(phase.activation_bytes / 4, rel=0.01)
    # four processes, each loading the pipeline
    assert split.peak_ram_bytes == pytest.approx(4 * one.peak_ram_bytes, rel=0.01)


def test_a_ring_split_holds_the_gathered_keys_and_values_beside_its_share():
    """diffusers' ring attention concatenates each GPU's keys and values and all-gathers them, then merges
    the partial outputs in float32 (TemplatedRingAttention.forward, convert_to_fp32): while an attention
    runs, a GPU holds the whole sequence's K and V (bf16) and its own pair, and four float32 tensors of
    its tokens, beside its share of the activations; Ulysses' all-to-alls hold only shards. Estimated
    in one scenario, as the search estimates its candidates (one memo), in either order."""
    from advisor.plan.scenario import Request, scenario_for

    request = Request(model=WAN_14B, gpu="8x H100", height=720, width=1280, frames=81)
    tokens = 21 * (720 // 16) * (1280 // 16)  # 81 frames -> 21 latent frames; 8x VAE, 2x2 patches
    hidden, batch, n = 5120, 1, 8  # Wan 14B: 40 heads x 128; guidance runs as a second call
    held = 2 * batch * tokens * hidden * 2 * (1 + 1 / n) + 4 * batch * tokens / n * hidden * 4
    for order in (("ulysses", "ring"), ("ring", "ulysses")):
        scenario = scenario_for(request)
        peaks = {}
        for kind in order:
            split = ContextParallel(degree=n, kind=kind)
            config = OptimizationConfig(attention_backend="_native_cudnn", context_parallel=split)
            result = estimate(scenario.profile, scenario.workload, config, scenario.target, memo=scenario.memo)
            peaks[kind] = {p.name: p for p in result.phases}["denoising"].activation_bytes
        assert peaks["ring"] - peaks["ulysses"] == pytest.approx(held, rel=0.01), order


def test_ulysses_sends_less_than_ring():
    # Ulysses: 4 all-to-alls of a GPU's shard, sending all but 1/N of it; ring gathers N-1 shards of k and v
    shape = SimpleNamespace(batch=1, tokens=4608, hidden=3072, dtype_bytes=2)
    tensor = 4608 * 3072 * 2
    assert link_bytes(ContextParallel(degree=2), shape) == pytest.approx(4 * tensor / 2 * 1 / 2)
    assert link_bytes(ContextParallel(degree=4, kind="ring"), shape) == pytest.approx(2 * tensor / 4 * 3)


def test_a_second_geforce_card_splits_flux_and_says_what_limits_it():
    result = recommend(_scenario(FLUX, "2x RTX 4090"))
    assert result.best.config.context_parallel == ContextParallel(degree=2)
    said = "\n".join(result.reasons)
    assert "context parallel: ulysses over 2 GPUs" in said
    assert "PCIe through host memory" in said


# --- one pipeline per GPU -------------------------------------------------------------------------


def test_a_job_of_many_images_runs_one_pipeline_per_gpu():
    # No communication, twice the images an hour: splitting one image can't beat that (its speed-up is
    # below 2 on two GPUs, published: 1.68x on two L20s)
    result = recommend(_scenario(FLUX, "2x RTX 3060", images=100))
    assert result.best.config.replicas == Replicas(count=2)
    said = "\n".join(result.reasons)
    assert "one pipeline per GPU: 2 processes" in said


def test_one_image_at_a_time_gains_nothing_from_a_second_pipeline():
    scenario = _scenario("stabilityai/stable-diffusion-3-medium-diffusers", "2x RTX 4090")
    result = recommend(scenario)
    assert result.best.config.replicas is None and result.best.config.context_parallel is None
    said = "\n".join(result.reasons)
    assert "second GPU" in said and "--images" in said


# --- running it -----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(model_dir, config: OptimizationConfig, tmp_path, ranks: int):
    import numpy

    config_path = tmp_path / f"config-{ranks}.json"
    config_path.write_text(config.to_json())
    out = tmp_path / f"out-{ranks}.npy"
    port = str(_free_port())
    processes = []
    for rank in range(ranks):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(ranks),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "HF_HUB_OFFLINE": "1",
        }
        command = [sys.executable, "-m", "advisor.testing.distributed", str(model_dir), str(config_path), str(out)]
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outputs = [p.communicate(timeout=600)[0].decode() for p in processes]
    assert [p.returncode for p in processes] == [0] * ranks, outputs
    facts = [json.loads((tmp_path / f"out-{ranks}.npy.rank{rank}.json").read_text()) for rank in range(ranks)]
    return numpy.load(out), facts


@pytest.mark.slow
def test_two_gloo_processes_split_the_transformer_and_match_one(tiny_flux_dir, tmp_path):
    # torchrun's environment, two processes on the gloo backend: load_pipeline joins the group and
    # splits the transformer (Ulysses over 2); the image matches one process's
    import numpy

    alone = OptimizationConfig(device="cpu", dtype="float32")
    split = alone.replace(context_parallel=ContextParallel(degree=2))
    reference, [one] = _run_ranks(tiny_flux_dir, alone, tmp_path, 1)
    image, ranks = _run_ranks(tiny_flux_dir, split, tmp_path, 2)
    assert [facts["processes"] for facts in ranks] == [2, 2]
    # each process's transformer blocks saw half the image tokens of every call
    assert [facts["block_tokens"] for facts in ranks] == [[n // 2 for n in one["block_tokens"]]] * 2
    assert image.shape == reference.shape
    assert numpy.abs(image - reference).max() < 1e-4


def test_a_context_parallel_config_refuses_a_process_torchrun_did_not_start(monkeypatch):
    from advisor.errors import ConfigError
    from advisor.run.steps import process_steps

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    steps = process_steps(OptimizationConfig(device="cpu", context_parallel=ContextParallel(degree=2)))
    with pytest.raises(ConfigError, match=r"torchrun --nproc-per-node 2"):
        steps[-1].run(None)


def test_the_config_round_trips_and_checks_its_sections():
    config = OptimizationConfig(context_parallel=ContextParallel(degree=4, kind="ring"))
    assert OptimizationConfig.from_dict(json.loads(config.to_json())) == config
    with pytest.raises(ValueError, match="context_parallel.degree: 1"):
        ContextParallel(degree=1)
    with pytest.raises(ValueError, match="replicas.count: 1"):
        Replicas(count=1)


def test_tune_measures_one_gpu_and_says_so():
    from advisor.plan.scenario import on_one_gpu
    from advisor.plan.space import SearchSpace

    scenario, note = on_one_gpu(_scenario(FLUX, "2x RTX 4090"))
    assert scenario.target.gpu_count == 1 and scenario.target.link is None
    assert note.startswith("tune measures one GPU of the 2")
    # a trial is one process: no candidate of the space needs several
    assert {"none"} == set(SearchSpace.for_scenario(scenario).choices("context_parallel"))
    assert on_one_gpu(scenario) == (scenario, None)


def test_emitted_scripts_say_how_to_start_their_processes():
    from advisor.run.emit import emit_python

    split = emit_python(FLUX, OptimizationConfig(context_parallel=ContextParallel(degree=2)))
    assert "torchrun --nproc-per-node 2" in split
    assert "pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))" in split
    assert "if torch.distributed.get_rank() == 0:" in split  # every process holds the whole image: one saves it
    assert "generator=torch.Generator().manual_seed(0)" in split  # every process starts from the same noise
    assert split.rstrip().endswith("torch.distributed.destroy_process_group()")
    compile(split, "split.py", "exec")
    shared = emit_python(FLUX, OptimizationConfig(replicas=Replicas(count=2)))
    assert 'for n in range(int(os.environ["RANK"]), 2, 2):' in shared
    assert "torch.distributed.init_process_group" not in shared  # nothing crosses between the GPUs
    # model offload in each process onloads to its own GPU (diffusers' default is cuda:0 whatever the process)
    offloaded = emit_python(FLUX, OptimizationConfig(replicas=Replicas(count=2), offload=Offload(strategy="model")))
    assert "pipe.enable_model_cpu_offload(gpu_id=torch.cuda.current_device())" in offloaded
    compile(shared, "shared.py", "exec")


def test_the_probe_shows_each_gpus_nvlinks_and_peers(monkeypatch):
    import io
    from dataclasses import replace

    from test_hardware import H100_READINGS

    from advisor import render
    from advisor.probe.hardware import gpu_from_nvml_readings, probe_machine, probe_software

    gpus = [gpu_from_nvml_readings(i, {**H100_READINGS, "nvlinks_active": 18, "peers": [1 - i]}) for i in range(2)]
    profile = replace(probe_machine(), gpus=gpus, gpu_source="nvml", software=probe_software(gpus))
    out = io.StringIO()
    monkeypatch.setattr(render, "text_console", lambda: render.PlainConsole(out, width=200))
    render.render_probe(profile)
    text = out.getvalue()
    assert "18 NVLinks up, peer access to 1" in text and "18 NVLinks up, peer access to 0" in text
    assert json.loads(json.dumps(profile.to_dict()))["gpus"][0]["peers"] == [1]


# --- components over the GPUs ---------------------------------------------------------------------


def test_the_balanced_map_is_diffusers_own():
    # diffusers' _assign_components_to_devices, run on the same sizes, gives the same map
    from diffusers.pipelines.pipeline_loading_utils import _assign_components_to_devices

    from advisor.levers.offload.balanced import balanced_map

    profile = load_profile(FLUX)
    for gpus, free in ((2, 32 * GIB), (2, 20 * GIB), (3, 24 * GIB)):
        ours = balanced_map(profile.components, "bfloat16", gpus, free)
        sizes = sorted(((c.name, c.parameters * 2) for c in profile.components), key=lambda i: i[1], reverse=True)
        theirs = _assign_components_to_devices(dict(sizes), dict.fromkeys(range(gpus), free))
        assert {name: at for at, names in theirs.items() for name in names if at != "cpu"} == {
            name: at for name, at in ours.items() if at != "cpu"
        }
        assert set(theirs.get("cpu", [])) <= {name for name, at in ours.items() if at == "cpu"}
    # the zig-zag on two GPUs: FLUX.1-dev's VAE lands on the transformer's GPU
    assert balanced_map(profile.components, "bfloat16", 2, 32 * GIB) == {
        "transformer": 0,
        "text_encoder_2": 1,
        "text_encoder": 1,
        "vae": 0,
    }


def test_bf16_flux_over_two_32gb_cards_needs_no_offload():
    # 31.4 GiB of bf16 weights (22.2 transformer + 8.9 T5 + CLIP + VAE) exceed one RTX 5090's budget;
    # spread over two, each GPU holds its components and the activations of the phases it runs
    result = recommend(_scenario(FLUX, "2x RTX 5090", quality="exact"))
    config, estimate_ = result.best.config, result.best.estimate
    assert config.offload.device_map == "balanced" and config.offload.strategy == "none"
    weights = estimate_.weight_bytes
    gpu0, gpu1 = estimate_.gpu_peaks_bytes["0"], estimate_.gpu_peaks_bytes["1"]
    assert weights["transformer"] + weights["vae"] < gpu0 <= result.scenario.budget_bytes
    assert weights["text_encoder"] + weights["text_encoder_2"] < gpu1 < gpu0
    said = "\n".join(result.reasons)
    assert "GPU 0: transformer, vae" in said and "GPU 1: text_encoder_2, text_encoder" in said


def test_components_over_the_gpus_load_with_the_map_and_never_move():
    from advisor.config import Offload
    from advisor.levers.offload import OFFLOAD
    from advisor.run.quantize import pipeline_kwargs
    from advisor.run.steps import plan

    config = OptimizationConfig(offload=Offload(device_map="balanced"))
    assert pipeline_kwargs(config, FLUX)["device_map"] == "balanced"
    # no pipe.to: diffusers refuses it on a mapped pipeline
    assert [step for step in plan(config, model=FLUX) if step.key == "offload"] == []
    with pytest.raises(ValueError, match="goes with `strategy: none`"):
        Offload(strategy="model", device_map="balanced")
    # a GGUF checkpoint is built apart and handed over: the map would not place it
    from advisor.levers.gguf import GGUF_BACKEND

    gguf = config.replace(quantization=GGUF_BACKEND.choices(["transformer"], FLUX)[0])
    said = [why for f in OFFLOAD.filters if (why := f.check(gguf, _scenario(FLUX, "2x RTX 5090")))]
    assert said == ["transformer is built from its own checkpoint, which the map does not place"]
    # one way of using several GPUs at a time: refused wherever a config is checked (planner, loading, emit)
    from advisor.constraints import Platform, first_violation
    from advisor.errors import ConfigError
    from advisor.run.emit import emit_python

    split = config.replace(context_parallel=ContextParallel(degree=2))
    assert first_violation(split, Platform.anywhere()).constraint.name == "one-way-of-using-several-gpus"
    with pytest.raises(ConfigError, match="two ways of using several GPUs"):
        emit_python(FLUX, split)
    assert OFFLOAD.filters  # the spread's own: a component left on the CPU (below)


def test_a_pipeline_not_loaded_with_the_map_is_refused(tiny_flux_dir):
    from diffusers import DiffusionPipeline

    from advisor.config import Offload
    from advisor.levers.offload import OFFLOAD
    from advisor.run.classes import Components

    pipe = DiffusionPipeline.from_pretrained(tiny_flux_dir)
    config = OptimizationConfig(offload=Offload(device_map="balanced"))
    problem = OFFLOAD.pipeline_problem(config, pipe, Components.of_pipe(pipe))
    assert problem.startswith("`offload.device_map: balanced` spreads the components over the GPUs")


def test_check_claims_nothing_about_a_plan_its_one_virtual_gpu_cant_run():
    from advisor.config import Offload
    from advisor.rehearse.rehearsal import rehearse

    spread = rehearse(None, OptimizationConfig(offload=Offload(device_map="balanced")), None)
    split = rehearse(None, OptimizationConfig(context_parallel=ContextParallel(degree=2)), None)
    assert spread.not_rehearsed.startswith("`offload.device_map`") and spread.failure is None
    assert split.not_rehearsed.startswith("`context_parallel`: a generation split over 2 processes")
