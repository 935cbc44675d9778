"""`advisor recommend --emit python` and the summary line of `recommend`.

The script saves what it generates (``image.save`` / diffusers' ``export_to_video``), takes the
prompt as a variable, compiles, and is written without importing torch, diffusers, transformers,
torchao or bitsandbytes: the class facts it needs come from the class table, and they must be the
answers the real classes give (so the script does what ``advisor.apply_config`` does). The summary
line names every step the config makes the script apply; a CPU plan shows its one peak once.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
import textwrap

import pytest

from advisor.config import Compile, LayerwiseCasting, Offload, OptimizationConfig, Provenance, Quantization, Vae
from advisor.errors import ConfigError
from advisor.probe.layout import catalog_names, read_layout
from advisor.run import emit, quantize
from advisor.run import steps as run_steps
from advisor.run.classes import Components, _resolve_class


HEAVY = ("torch", "diffusers", "transformers", "torchao", "bitsandbytes", "accelerate")
IMAGE_WORKLOAD = {"kind": "image", "height": 1024, "width": 1024, "frames": 1, "steps": 28, "batch": 1}
VIDEO_WORKLOAD = {"kind": "video", "height": 480, "width": 832, "frames": 81, "steps": 50, "batch": 1}


def loading_code(config: OptimizationConfig, components: Components) -> list[str]:
    return [loading.code for loading in quantize.loadings(config, components)]


def _everything(components: Components, backend: str = "torchao") -> OptimizationConfig:
    """A config with every post-load step, naming this pipeline's components."""
    denoisers = components.denoisers()
    encoders = [n for n in components.modules() if components.layout.role(n) == "text_encoder"]
    return OptimizationConfig(
        quantization=Quantization(backend=backend, components=denoisers[:1] + encoders[1:]),
        layerwise_casting=LayerwiseCasting(components=denoisers[1:] + encoders[:1])
        if len(denoisers) > 1 or encoders
        else None,
        channels_last=True,
        # Leaf by leaf on a stream: the one group offloading of a bitsandbytes model that keeps its
        # scales on the card (constraint bitsandbytes-group-offload-needs-leaf-streams).
        offload=Offload(strategy="group", offload_type="leaf_level", use_stream=True, components=denoisers),
        vae=Vae(tiling=True, slicing=True),
        compile=Compile(
            components=denoisers,
            fullgraph=False,
            dynamo_config={"cache_size_limit": 1000, "capture_dynamic_output_shape_ops": True},
        ),
    )


# --- the script: a prompt variable, the save call, valid Python ------------------------------------


@pytest.mark.parametrize(
    "model, workload, output",
    [
        (
            "black-forest-labs/FLUX.1-dev",
            IMAGE_WORKLOAD,
            ["image = pipe(prompt=prompt, ", ").images[0]", 'image.save("image.png")'],
        ),
        ("stabilityai/stable-diffusion-xl-base-1.0", IMAGE_WORKLOAD, ['image.save("image.png")']),
        (
            "Wan-AI/Wan2.1-T2V-14B-Diffusers",
            VIDEO_WORKLOAD,
            ["video = pipe(prompt=prompt, ", ").frames[0]", 'export_to_video(video, "video.mp4", fps=16)'],
        ),
        ("THUDM/CogVideoX-5b", {**VIDEO_WORKLOAD, "frames": 49}, ['export_to_video(video, "video.mp4", fps=8)']),
    ],
)
def test_the_script_takes_the_prompt_as_a_variable_and_saves_the_result(model, workload, output):
    config = OptimizationConfig(
        quantization=Quantization(backend="bitsandbytes_4bit", components=Components.of_model(model).denoisers()),
        offload=Offload(strategy="model"),
        provenance=Provenance(workload=workload),
    )
    script = emit.emit_python(model, config)
    compile(script, "generated.py", "exec")
    lines = script.splitlines()
    prompt_line = next(i for i, line in enumerate(lines) if line.startswith("prompt = "))
    assert isinstance(json.loads(lines[prompt_line].removeprefix("prompt = ")), str)
    assert prompt_line < next(i for i, line in enumerate(lines) if line.startswith("pipe = "))
    assert "prompt=prompt" in lines[-2]  # the call uses it
    for part in output:
        assert part in script
    assert script.endswith(output[-1] + "\n")
    if workload["kind"] == "video":
        assert "from diffusers.utils import export_to_video" in lines
        assert "imageio" in script  # what export_to_video needs, said in the script


def test_a_batch_saves_every_image_and_every_video():
    image = emit.emit_python(
        "black-forest-labs/FLUX.1-dev",
        OptimizationConfig(provenance=Provenance(workload={**IMAGE_WORKLOAD, "batch": 2})),
    )
    assert "num_images_per_prompt=2).images\n" in image
    assert image.endswith('for i, image in enumerate(images):\n    image.save(f"image_{i}.png")\n')
    video = emit.emit_python(
        "Wan-AI/Wan2.1-T2V-14B-Diffusers",
        OptimizationConfig(provenance=Provenance(workload={**VIDEO_WORKLOAD, "batch": 3})),
    )
    assert "num_videos_per_prompt=3).frames\n" in video
    assert video.endswith('for i, video in enumerate(videos):\n    export_to_video(video, f"video_{i}.mp4", fps=16)\n')
    for script in (image, video):
        compile(script, "generated.py", "exec")


def test_the_video_script_runs_and_hands_its_frames_to_export_to_video(tiny_wan_dir, tmp_path):
    """The tiny Wan script end to end; export_to_video is replaced by a stand-in that binds its
    arguments to the real signature (imageio may not be installed) and keeps the frames."""
    config = OptimizationConfig(device="cpu", provenance=Provenance(workload=VIDEO_WORKLOAD))
    script = emit.emit_python(str(tiny_wan_dir), config)
    call = "video = pipe(prompt=prompt, height=480, width=832, num_inference_steps=50, num_frames=81).frames[0]\n"
    assert call in script and script.endswith('export_to_video(video, "video.mp4", fps=16)\n')
    stand_in = textwrap.dedent("""\
        import inspect, numpy as np, diffusers.utils
        _real = diffusers.utils.export_to_video
        def _export(*args, **kwargs):
            bound = inspect.signature(_real).bind(*args, **kwargs)
            frames = np.asarray(bound.arguments["video_frames"])
            assert frames.ndim == 4 and frames.shape[-1] == 3, frames.shape
            np.save(bound.arguments["output_video_path"] + ".npy", frames)
        diffusers.utils.export_to_video = _export
    """)
    script = stand_in + script.replace(
        call,
        "from advisor.testing import tiny_call_kwargs\n"
        'video = pipe(prompt=prompt, **{k: v for k, v in tiny_call_kwargs("video", seed=0).items() if k != "prompt"}).frames[0]\n',
    )
    (tmp_path / "generated.py").write_text(script)
    result = subprocess.run(
        [sys.executable, "generated.py"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    import numpy as np

    assert np.load(tmp_path / "video.mp4.npy").shape[0] == 5  # the tiny call's frames


def test_export_to_video_takes_the_frames_a_path_and_fps():
    from diffusers.utils import export_to_video

    inspect.signature(export_to_video).bind([], "video.mp4", fps=16)


# --- no heavy import ---------------------------------------------------------------------------------


def test_the_emit_path_imports_neither_torch_nor_diffusers_nor_torchao():
    """`recommend --emit python` (bitsandbytes and torchao plans, image and video) and scripts with
    every step import none of the heavy libraries, and print nothing on stderr."""
    code = textwrap.dedent(
        """\
        import sys, warnings
        from advisor.cli import main
        from advisor.config import OptimizationConfig, Quantization
        from advisor.run import emit
        from test_emit import _everything, Components
        for args in (["-m", "flux-dev", "--gpu", "RTX 4090", "--budget", "16GB"], ["-m", "sdxl", "--gpu", "RTX 4090"],
                     ["-m", "wan2.1-t2v-14b", "--gpu", "RTX 4090"], ["-m", "flux-dev", "--gpu", "RTX 3060", "--budget", "6GB"]):
            assert main(["recommend", *args, "--emit", "python"]) == 0, args
        for model in ("black-forest-labs/FLUX.1-dev", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "stabilityai/stable-diffusion-3.5-large"):
            for backend in ("torchao", "bitsandbytes_4bit"):
                config = _everything(Components.of_model(model), backend)
                if backend != "torchao":
                    config = config.replace(layerwise_casting=None)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # SD3's regional compile falls back to the whole model, and says so
                    print(emit.emit_python(model, config))
        heavy = sorted({m.split(".")[0] for m in sys.modules} & set(%r))
        print("HEAVY", heavy)
    """
        % (HEAVY,)
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "HEAVY []"
    assert result.stdout.count("pipe = DiffusionPipeline.from_pretrained(") == 10
    assert (
        "from torchao.quantization import" in result.stdout
    )  # the torchao scripts name it; writing them doesn't import it
    assert result.stderr == ""


# --- the class table answers what the classes answer ---------------------------------------------------


def _resolved(model: str) -> Components:
    """The model's components with every class imported: what `Components` answered before the table."""
    layout = read_layout(model)
    return Components(layout, {name: _resolve_class(e.library, e.class_name) for name, e in layout.entries.items()})


@pytest.mark.filterwarnings("ignore::advisor.errors.ConfigWarning")  # SD3, CogVideoX: regional compile falls back
@pytest.mark.parametrize("model", catalog_names())
def test_the_table_answers_like_the_classes_for_every_catalog_model(model):
    static = Components.of_model(model)
    attrs = ("_repeated_blocks", "enable_tiling", "enable_slicing")  # asked of diffusers models only
    answers = {
        name: (
            static.is_module(name), static.is_diffusers_model(name), static.keep_in_fp32(name) if static.is_module(name) else None,
            tuple(static.has_attr(name, a) for a in attrs) if static.is_diffusers_model(name) else None,
        )
        for name in static.names()
    }  # fmt: skip
    assert static.classes == {}  # nothing was imported to answer
    resolved = _resolved(model)
    for name, answer in answers.items():
        diffusers_model = resolved.is_diffusers_model(name)
        expected = (
            resolved.is_module(name), diffusers_model, resolved.keep_in_fp32(name) if resolved.is_module(name) else None,
            tuple(resolved.has_attr(name, a) for a in attrs) if diffusers_model else None,
        )  # fmt: skip
        assert answer == expected, name
    assert static.modules() == resolved.modules() and static.denoisers() == resolved.denoisers()
    for backend in ("torchao", "bitsandbytes_4bit"):
        config = _everything(static, backend)
        assert [s.code for s in run_steps.steps_for(config, static)] == [
            s.code for s in run_steps.steps_for(config, resolved)
        ]
        assert loading_code(config, static) == loading_code(config, resolved)


@pytest.mark.parametrize("kind", ["image", "video"])
def test_the_script_has_the_steps_apply_config_runs_on_the_loaded_pipeline(tiny_flux_dir, tiny_wan_dir, kind):
    from diffusers import DiffusionPipeline

    folder = {"image": tiny_flux_dir, "video": tiny_wan_dir}[kind]
    pipe = DiffusionPipeline.from_pretrained(folder)
    static, loaded = Components.of_model(folder), Components.of_pipe(pipe)
    config = _everything(static).replace(device="cpu")
    steps = run_steps.steps_for(config, static)
    assert [s.code for s in steps] == [s.code for s in run_steps.steps_for(config, loaded)]
    assert loading_code(config, static) == loading_code(config, loaded)
    assert {s.key for s in steps} >= {
        "layerwise_casting",
        "channels_last",
        "offload",
        "vae",
        "compile",
        "compile.dynamo_config",
    }


def test_the_facts_taken_for_known_are_true_of_the_installed_libraries():
    import torch._dynamo
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
    from diffusers.utils import deprecation_utils

    from advisor.levers.layerwise_casting import DEFAULT_CASTING_SKIP_PATTERNS

    assert all(hasattr(torch._dynamo.config, option) for option in emit.KNOWN_DYNAMO_OPTIONS)
    assert emit.KNOWN_COMPILE_BACKENDS <= set(torch._dynamo.list_backends(exclude_tags=()))
    assert DEFAULT_CASTING_SKIP_PATTERNS == tuple(DEFAULT_SKIP_MODULES_PATTERN)
    read = quantize._source_defines("diffusers", ("utils", "deprecation_utils.py"), "_resolve_dtype")
    assert read is hasattr(deprecation_utils, "_resolve_dtype")
    assert quantize.dtype_keyword() == ("dtype" if read else "torch_dtype")


def test_values_only_the_libraries_can_check_are_still_checked():
    from advisor.errors import ConfigError

    with pytest.raises(ConfigError, match="`compile.backend: nope`"):
        emit.emit_python("black-forest-labs/FLUX.1-dev", OptimizationConfig(compile=Compile(backend="nope")))
    # An attention kernel is checked against diffusers' names when the config is made (advisor/data/diffusers.json).
    with pytest.raises(ValueError, match="`attention_backend: 'warp'` is not one of diffusers' attention backends"):
        OptimizationConfig(attention_backend="warp")


# --- the summary line --------------------------------------------------------------------------------


def _named(step: run_steps.Step, config: OptimizationConfig) -> str:
    """What the summary must say for a step of the script."""
    if step.key == "compile.dynamo_config":
        return step.code.removeprefix("torch._dynamo.config.").replace(" = ", "=")
    return {
        "layerwise_casting": "fp8 storage(",
        "channels_last": "channels_last",
        "offload": config.offload.label(),
        "vae": step.description,  # "VAE tiling"
        "attention_backend": f"{config.attention_backend} attention",
        "compile": "compiled",
    }[step.key]


def test_the_summary_names_every_step_the_script_applies():
    model = "stabilityai/stable-diffusion-xl-base-1.0"
    components = Components.of_model(model)
    config = _everything(components).replace(attention_backend="native")
    line = run_steps.summary(config)
    assert line.startswith(config.summary())
    for step in run_steps.steps_for(config, components):
        assert _named(step, config) in line, (step.key, line)
    assert config.quantization.label() in line
    assert emit.emit_python(model, config).startswith(f"# {line}\n")


def test_recommend_for_sdxl_says_channels_last(capsys):
    from advisor.cli import main

    main(["recommend", "-m", "sdxl", "--gpu", "RTX 4090", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert data["config"]["channels_last"]  # the engine's pick for a compiled UNet
    main(["recommend", "-m", "sdxl", "--gpu", "RTX 4090"])
    out = capsys.readouterr().out
    recommended = out.split("Recommended: ", 1)[1].split("\n  peak", 1)[0]  # the summary, however it wraps
    assert "channels_last" in recommended
    assert "peak VRAM" in out and "host RAM" in out  # a GPU plan: both memories


def test_a_cpu_plan_shows_its_peak_ram_once(tiny_flux_dir, capsys, monkeypatch):
    import advisor.probe.hardware as hardware

    real = hardware.probe_machine
    monkeypatch.setattr(
        hardware,
        "probe_machine",
        lambda *a, **k: dataclasses.replace(real(*a, **k), gpus=[], gpu_source="none", gpu_note="test"),
    )
    from advisor.cli import main

    assert main(["recommend", "-m", str(tiny_flux_dir), "--height", "64", "--width", "64"]) == 0
    out = capsys.readouterr().out
    detail = next(line for line in out.splitlines() if line.strip().startswith("peak RAM"))
    assert detail.count("RAM") == 1
    header = next((line for line in out.splitlines() if "configuration" in line), None)
    if header is not None:  # the alternatives table: one memory column
        assert header.count("RAM") == 1 and "latency" in header


def test_a_plan_with_nothing_offloaded_loads_straight_onto_the_gpu(tiny_flux_dir):
    """Where every weight stays on the card, diffusers loads each component there from its mmapped
    files (``from_pretrained(device_map="cuda")``), so nothing is staged in host RAM; the estimate
    assumes it, so the script and `load_pipeline` must do it."""
    resident = OptimizationConfig(device="cuda")
    assert quantize.pipeline_kwargs(resident)["device_map"] == "cuda"
    script = emit.emit_python(str(tiny_flux_dir), resident)
    assert 'device_map="cuda"' in script
    assert "pipe.to(" not in script  # loaded there: no move after it


def test_the_move_to_the_gpu_is_left_to_apply_config_where_the_pipeline_loaded_there(tiny_flux_dir):
    """`load_pipeline` loads with device_map="cuda", so it skips the move; `apply_config`, given a
    pipeline loaded some other way, keeps it. On this CPU machine the move itself would fail."""
    from diffusers import DiffusionPipeline

    from advisor.run import apply
    from advisor.run.steps import plan

    resident = OptimizationConfig(device="cuda")
    pipe = DiffusionPipeline.from_pretrained(str(tiny_flux_dir))
    [move] = plan(resident, pipe)
    assert move.code == 'pipe.to("cuda")' and move.done_by_loading
    apply._run_steps(pipe, resident, loaded_as_planned=True)  # nothing to do: it loaded there
    assert pipe.transformer.device.type == "cpu"
    with pytest.raises((AssertionError, RuntimeError)):  # the move, tried on a machine without CUDA
        apply._run_steps(pipe, resident)


@pytest.mark.parametrize(
    "staged",
    [
        OptimizationConfig(device="cuda", offload=Offload(strategy="model")),  # loading to the card defeats it
        OptimizationConfig(device="cuda", offload=Offload(strategy="group")),
        OptimizationConfig(device="cpu"),
        # cast on the host before it moves: on the card its weights would first be there at bf16
        OptimizationConfig(device="cuda", layerwise_casting=LayerwiseCasting(components=["transformer"])),
        # diffusers' SUPPORTED_DEVICE_MAP is "balanced", get_device() ("cuda") and "cpu": not "cuda:1"
        OptimizationConfig(device="cuda:1"),
    ],
    ids=["model-offload", "group-offload", "cpu", "layerwise-casting", "second-gpu"],
)
def test_plans_that_stage_weights_on_the_host_load_there(staged, tiny_flux_dir):
    assert "device_map" not in quantize.pipeline_kwargs(staged)
    assert "device_map" not in emit.emit_python(str(tiny_flux_dir), staged)


def test_4bit_models_group_offloaded_load_on_the_host_and_each_moves_to_the_gpu_before_its_offloading(tiny_flux_dir):
    """Group offloading moves a weight's data, not bitsandbytes' scales: a 4-bit model loaded on the
    host moves to the GPU whole (its quant_state with it) just before its own offloading, one model
    at a time. 8-bit scales don't move with ``.to``: those load onto the GPU as before."""
    leaf = Offload(strategy="group", offload_type="leaf_level", use_stream=True, record_stream=True)
    both = Quantization(backend="bitsandbytes_4bit", components=["transformer", "text_encoder_2"])
    script = emit.emit_python(str(tiny_flux_dir), OptimizationConfig(device="cuda", quantization=both, offload=leaf))
    assert 'device_map="cpu"' in script
    lines = [line for line in script.splitlines() if line.startswith("pipe.") or line.startswith("apply_group")]
    for name in both.components:
        moved = lines.index(f'pipe.{name}.to("cuda")')
        assert lines[moved + 1] in (f"pipe.{name}.enable_group_offload(", "apply_group_offloading(")
    assert 'pipe.vae.to("cuda")' not in script  # not quantized: loaded on the host, offloaded from there

    # 8-bit: loaded onto the GPU (no map), where group offloading can't move it off at all: refused.
    eight = OptimizationConfig(device="cuda", quantization=both.replace(backend="bitsandbytes_8bit"), offload=leaf)
    assert "device_map" not in quantize.pipeline_kwargs(eight)
    with pytest.raises(ConfigError, match="bitsandbytes-8bit-stays-on-the-card|8-bit weights stay there"):
        emit.emit_python(str(tiny_flux_dir), eight)


def test_with_the_models_unknown_each_4bit_model_still_moves_and_offloads_before_the_next(tiny_flux_dir):
    """Planning without the pipeline at hand (no model_index.json): the 4-bit models are named by the
    config, so each is moved and offloaded on its own, and a loop offloads whatever else the pipeline
    holds, never `enable_group_offload(exclude_modules=...)`, which would move the named ones back
    onto the GPU whole. The loop's code runs as shown."""
    import torch
    from diffusers import DiffusionPipeline
    from diffusers.hooks.group_offloading import _is_group_offload_enabled

    from advisor.levers.offload.steps import _offload_the_others_step, placement_steps

    leaf = Offload(strategy="group", offload_type="leaf_level", use_stream=True)
    both = Quantization(backend="bitsandbytes_4bit", components=["transformer", "text_encoder_2"])
    steps = placement_steps(
        OptimizationConfig(device="cuda", quantization=both, offload=leaf), Components.of_model(None)
    )
    codes = [step.code for step in steps]
    for name in both.components:
        moved = codes.index(f'pipe.{name}.to("cuda")')
        assert codes[moved + 1].startswith(f"apply_group_offloading(\n    pipe.{name},")
    assert "enable_group_offload" not in "\n".join(codes)
    assert codes[-1].startswith("for name, component in pipe.components.items():")

    pipe = DiffusionPipeline.from_pretrained(str(tiny_flux_dir))
    on_cpu = {"onload_device": "cpu", "offload_device": "cpu", "offload_type": "leaf_level"}
    _offload_the_others_step("group offload", ["transformer"], on_cpu).run(pipe)
    modules = {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    assert {name for name, c in modules.items() if _is_group_offload_enabled(c)} == set(modules) - {"transformer"}
