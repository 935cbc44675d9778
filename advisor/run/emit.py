"""`advisor recommend --emit python`: a runnable diffusers script that does what ``load_pipeline`` does.

Generated from the same `Step` objects that `advisor.run.apply` runs, so the two cannot drift apart.
Writing it imports neither torch nor diffusers (each takes seconds): the components and their class
facts come from the model's layout and the class table (`advisor.run.classes`), and the checks
that need the libraries run only for values the advisor does not write itself (`_check`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from advisor import levers
from advisor.constraints import Platform, first_violation
from advisor.errors import ConfigError
from advisor.levers.code import Expr, call_source, dtype_expr, source
from advisor.run.checks import check_components, check_config
from advisor.run.classes import Components
from advisor.run.quantize import dtype_keyword, loadings
from advisor.run.steps import process_steps, steps_for, summary


if TYPE_CHECKING:
    from advisor.config import OptimizationConfig

# What `check_config` would ask torch about, for the values the planner writes (advisor.plan.rules):
# these dynamo options and compile backends exist in every torch the advisor supports
# (tests/test_emit.py checks them against the installed one).
KNOWN_DYNAMO_OPTIONS = frozenset({"cache_size_limit", "capture_dynamic_output_shape_ops"})
KNOWN_COMPILE_BACKENDS = frozenset({"inductor", "eager", "aot_eager"})

PROMPTS = {
    "image": "a photo of a cat",
    "video": "a cat walks on the grass, realistic",
    "audio": "techno music with a strong beat",
}
# Frame rates of the examples in each pipeline's diffusers docstring; others get export_to_video's default (10).
VIDEO_FPS = {"WanPipeline": 16, "CogVideoXPipeline": 8, "HunyuanVideoPipeline": 15, "LTXPipeline": 24}


def _check(config: OptimizationConfig) -> None:
    """`check_config`, without importing torch or diffusers when the config holds only values known to pass."""
    c = config.compile
    needs_libraries = config.attention_backend is not None or (
        c is not None and (not set(c.dynamo_config) <= KNOWN_DYNAMO_OPTIONS or c.backend not in KNOWN_COMPILE_BACKENDS)
    )
    if needs_libraries:
        check_config(config)
        return
    violation = first_violation(config.replace(device="cuda"), Platform.anywhere())
    if violation is not None:
        raise ConfigError(violation.message)


def _workload_kind(config: OptimizationConfig, components: Components) -> str:
    workload = config.provenance.workload or {}
    for key in ("kind", "workload", "type"):
        if workload.get(key) in ("image", "video", "audio"):
            return workload[key]
    pipeline_class = components.pipeline_class or config.provenance.pipeline_class
    if pipeline_class:
        try:
            from advisor.probe.facts import classify_workload

            return classify_workload(pipeline_class)[0]
        except Exception:  # an unreadable class table: images are the common case
            pass
    return "image"


def _call_kwargs(config: OptimizationConfig, kind: str) -> dict[str, int]:
    """The job the config was made for (``provenance.workload``), as pipeline call arguments."""
    from advisor.probe.workload import Workload

    try:
        return Workload(**{**(config.provenance.workload or {}), "kind": kind}).call_kwargs()
    except TypeError:  # a hand-written provenance without the whole workload: the pipeline's defaults
        return {}


def _generate_and_save(kind: str, call: str, batch: bool, fps: int | None) -> list[str]:
    """The pipeline call and the lines saving what it made (every image or video of a batch)."""
    if kind == "video":
        export = "export_to_video({}, {}" + (f", fps={fps})" if fps else ")")
        if batch:
            return [
                f"videos = {call}.frames",
                "for i, video in enumerate(videos):",
                "    " + export.format("video", 'f"video_{i}.mp4"'),
            ]
        return [f"video = {call}.frames[0]", export.format("video", '"video.mp4"')]
    if kind == "audio":  # the sampling rate and array layout vary by pipeline: left to the user
        return [f"audio = {call}.audios[0]"]
    if batch:
        return [f"images = {call}.images", "for i, image in enumerate(images):", '    image.save(f"image_{i}.png")']
    return [f"image = {call}.images[0]", 'image.save("image.png")']


def emit_python(model: str, config: OptimizationConfig) -> str:
    """A runnable script, in the style of the diffusers docs, that does what ``load_pipeline(model, config)`` does,
    then generates from ``prompt`` and saves the result (``image.png``, ``video.mp4``).

    Machine checks are left to the machine that runs it; config problems (unknown components,
    impossible combinations) raise here.
    """
    from advisor import __version__

    _check(config)
    components = Components.of_model(model)
    check_components(config, components, str(model))
    loads = loadings(config, components)
    steps = steps_for(config, components)
    kind = _workload_kind(config, components)

    imports = ["import torch", "from diffusers import DiffusionPipeline"]
    if kind == "video":
        imports.append("from diffusers.utils import export_to_video")
    for line in (*(i for load in loads for i in load.imports), *(i for s in steps for i in s.imports)):
        if line not in imports:
            imports.append(line)
    imports = imports[:1] + sorted(imports[1:])

    load_kwargs = {load.keyword: Expr(load.variable, None) for load in loads}
    load_kwargs[dtype_keyword()] = dtype_expr(config.dtype)

    flags = [step for step in steps if step.key == "compile.dynamo_config"]  # first, as on the seed page
    # Before torch is imported: the allocator reads its settings when CUDA starts.
    first = process_steps(config)
    before = [
        *dict.fromkeys(i for step in first for i in step.imports),
        *(f"{s.code}  # {s.description}" for s in first),
    ]
    processes = levers.processes(config)
    launch = [f"# Run it as {processes} processes, one per GPU: torchrun --nproc-per-node {processes} SCRIPT.py"]
    imports = [line for line in imports if line not in before]
    lines = [
        f"# {summary(config)}",
        *(launch if processes > 1 else []),
        f"# Generated by advisor {__version__}: the same steps as advisor.load_pipeline({source(str(model))}, config).",
        *before,
        *imports,
        "",
        f"prompt = {source(PROMPTS[kind])}",
        "",
    ]
    lines += [step.code for step in flags] + ([""] if flags else [])
    lines += [load.code for load in loads if load.code]
    lines += ["pipe = " + call_source("DiffusionPipeline.from_pretrained", (str(model),), load_kwargs)]
    shown = [s for s in steps if s.key != "compile.dynamo_config" and not s.done_by_loading]
    if shown:
        lines += [""] + [line for s in shown for line in (f"# {s.description}", s.code)]
    call_kwargs = _call_kwargs(config, kind)
    call = call_source("pipe", (), {"prompt": Expr("prompt", None), **call_kwargs})
    batch = any(key.startswith("num_") and key.endswith("_per_prompt") for key in call_kwargs)
    fps = VIDEO_FPS.get(components.pipeline_class or config.provenance.pipeline_class or "")
    lines += [""]
    if kind == "video":
        lines += ["# export_to_video writes mp4 with imageio: pip install imageio imageio-ffmpeg"]
    lines += _on_several_gpus(config, _generate_and_save(kind, call, batch, fps), call)
    return "\n".join(lines) + "\n"


def _on_several_gpus(config: OptimizationConfig, lines: list[str], call: str) -> list[str]:
    """The generating lines as each of a multi-GPU plan's processes runs them: with one pipeline per
    GPU, this process's share of the job's images (each seeded by its number); split over the GPUs,
    every process takes part and the first saves what they made together."""
    processes, at_once = levers.processes(config), levers.generations_at_once(config)
    if processes == 1:
        return lines
    if at_once > 1:
        images = config.provenance.images or at_once
        seeded = call[:-1] + ", generator=torch.Generator().manual_seed(n))"
        shared = [
            line.replace(call, seeded)
            .replace('"image.png"', 'f"image_{n}.png"')
            .replace('"video.mp4"', 'f"video_{n}.mp4"')
            for line in lines
        ]
        shared = [
            line.replace('f"image_{i}.png"', 'f"image_{n}_{i}.png"').replace(
                'f"video_{i}.mp4"', 'f"video_{n}_{i}.mp4"'
            )
            for line in shared
        ]
        return [
            f"# one pipeline per GPU: this process makes images rank, rank + {at_once}, ... of the job's {images}",
            f'for n in range(int(os.environ["RANK"]), {images}, {at_once}):',
            *(f"    {line}" for line in shared),
        ]
    # every process must start from the same noise: one seed for all
    generate = [line.replace(call, call[:-1] + ", generator=torch.Generator().manual_seed(0))") for line in lines[:1]]
    return [
        *generate,
        "if torch.distributed.get_rank() == 0:  # every process holds the whole result",
        *(f"    {line}" for line in lines[1:]),
        "torch.distributed.destroy_process_group()",
    ]
