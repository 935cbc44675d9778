"""The offload lever's steps: device placement, as ``pipe.to(device)``, model / sequential CPU offload
or (whole or partial) group offload.

Pure Python at import: torch and diffusers only inside a step's ``run``.
"""

from __future__ import annotations

from typing import Any

from advisor.config import OptimizationConfig
from advisor.levers.code import Expr, Step, call_source, function_step, method_step, source
from advisor.levers.offload.strategies import (
    BLOCK_LEVEL,
    MODEL,
    NONE,
    SEQUENTIAL,
    loads_onto_device,
    moved_whole_before_offloading,
)


def _current_device() -> int:
    import torch

    return torch.cuda.current_device()


def placement_steps(config: OptimizationConfig, components: Any) -> list[Step]:
    device = config.device
    offload = config.offload
    if offload.device_map:  # loaded onto its GPUs by the map; diffusers refuses `.to` on a mapped pipeline
        return []
    if offload.strategy == NONE:
        # Where it loads there (device_map), only `apply_config`, given a pipeline loaded some other way, moves it.
        return [
            method_step(
                "offload",
                f"move the pipeline to {device}",
                None,
                "to",
                (device,),
                done_by_loading=loads_onto_device(config),
            )
        ]
    if offload.strategy in (MODEL, SEQUENTIAL):
        method = "enable_model_cpu_offload" if offload.strategy == MODEL else "enable_sequential_cpu_offload"
        kwargs = {} if device == "cuda" else {"device": device}
        if config.replicas and device == "cuda":  # else diffusers onloads to cuda:0 whatever set_device chose
            kwargs["gpu_id"] = Expr("torch.cuda.current_device()", _current_device, lazy=True)
        what = f"{offload.strategy} CPU offload: {'whole models' if offload.strategy == MODEL else 'every layer'}"
        return [method_step("offload", f"{what} move to {device} when used", None, method, (), kwargs)]

    kwargs: dict[str, Any] = {"onload_device": device, "offload_device": "cpu", "offload_type": offload.offload_type}
    if offload.offload_type == BLOCK_LEVEL:
        kwargs["num_blocks_per_group"] = offload.num_blocks_per_group
    for flag in ("use_stream", "record_stream", "non_blocking", "low_cpu_mem_usage"):
        if getattr(offload, flag):
            kwargs[flag] = True
    if offload.offload_to_disk_path:
        kwargs["offload_to_disk_path"] = offload.offload_to_disk_path
    partial = offload.resident_blocks or {}
    what = offload.replace(resident_blocks=None).label()  # of the components offloaded whole
    moved = moved_whole_before_offloading(config)
    names = offload.components
    if names is None and (partial or moved) and components.known:
        # Named one by one, not `enable_group_offload(exclude_modules=...)`: diffusers moves an
        # excluded module onto the device whole (pipeline_utils.py), which rehearsing partial offload
        # of bf16 FLUX.1-dev showed as 22.2 GB on the card before the partial step moved most back;
        # and a model moved onto the device before its offloading goes there just before it.
        names = components.modules()
    if names is None and moved:  # the pipeline's other models are not known until it runs
        steps = []
        for name in sorted(moved):
            steps.append(_move_whole_step(name, device))
            steps.append(
                function_step(
                    "offload", f"{what} of {name}", "diffusers.hooks", "apply_group_offloading", name, kwargs
                )
            )
        steps.append(_offload_the_others_step(what, [*sorted(moved), *partial], kwargs))
        return steps + [_partial_offload_step(name, count, device, kwargs) for name, count in partial.items()]
    if names is None:
        whole = {**kwargs, "exclude_modules": list(partial)} if partial else kwargs
        others = " but " + ", ".join(partial) if partial else ""
        steps = [method_step("offload", f"{what} of every model{others}", None, "enable_group_offload", (), whole)]
        return steps + [_partial_offload_step(name, count, device, kwargs) for name, count in partial.items()]

    steps = []
    for name in names:
        description = f"{what} of {name}"
        if name in moved:
            steps.append(_move_whole_step(name, device))
        if name in partial:
            steps.append(_partial_offload_step(name, partial[name], device, kwargs))
        elif components.is_diffusers_model(name):
            steps.append(method_step("offload", description, name, "enable_group_offload", (), kwargs))
        else:
            steps.append(
                function_step("offload", description, "diffusers.hooks", "apply_group_offloading", name, kwargs)
            )
    if components.known:
        # by name: a loaded pipe and its model_index.json list them in other orders
        for name in sorted(components.modules()):
            if name not in names:
                steps.append(method_step("offload", f"keep {name} on {device}", name, "to", (device,)))
    else:
        keep = list(names)

        def run(pipe: Any) -> None:
            import torch

            for name, component in pipe.components.items():
                if name not in keep and isinstance(component, torch.nn.Module):
                    component.to(device)

        code = (
            "for name, component in pipe.components.items():\n"
            f"    if name not in {source(keep)} and isinstance(component, torch.nn.Module):\n"
            f"        component.to({source(device)})"
        )
        steps.append(Step("offload", f"keep the other models on {device}", code, run))
    return steps


def _move_whole_step(name: str, device: str) -> Step:
    """Move a model quantized on the host onto `device` whole, its quantization state with it, right
    before its group offloading moves the weights' data back (`moved_whole_before_offloading`)."""
    description = f"move {name} to {device} with its quantization scales, which group offloading leaves where they are"
    return method_step("offload", description, name, "to", (device,))


def _offload_the_others_step(what: str, done: list[str], kwargs: dict[str, Any]) -> Step:
    """Group-offload every model of the pipeline but `done`, one by one: not
    ``enable_group_offload(exclude_modules=...)``, which moves the excluded models onto the device
    whole afterwards (pipeline_utils.py). Runs the very code it shows (`exec`)."""
    call = call_source("apply_group_offloading", [Expr("component", None)], kwargs)
    code = "\n".join(
        [
            "for name, component in pipe.components.items():",
            f"    if name not in {source(done)} and isinstance(component, torch.nn.Module):",
            *("        " + line for line in call.splitlines()),
        ]
    )
    imports = ("import torch", "from diffusers.hooks import apply_group_offloading")

    def run(pipe: Any) -> None:
        import torch
        from diffusers.hooks import apply_group_offloading

        exec(code, {"pipe": pipe, "torch": torch, "apply_group_offloading": apply_group_offloading})

    return Step("offload", f"{what} of the other models", code, run, imports)


def _partial_offload_step(name: str, count: int, device: str, kwargs: dict[str, Any]) -> Step:
    """Partial offload of one component: its `count` largest repeated blocks (those of its top-level
    ModuleLists, as diffusers' block-level offloading finds them; ties in model order) go to
    `device`, and diffusers' ``apply_group_offloading`` offloads the rest of the component while its
    block lists hold only the other blocks (the lists are whole again right after: the hooks sit on
    the blocks). Streams work as for plain group offload: diffusers orders the prefetches at the
    first call, over the blocks it offloads. The step runs the very code it shows (`exec`), so a
    script and `advisor.apply_config` cannot differ."""
    component = f"pipe.{name}"
    code = "\n".join(
        [
            f"lists = {{key: child for key, child in {component}.named_children() if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))}}",
            "blocks = [block for child in lists.values() for block in child]",
            f"resident = set(sorted(blocks, key=lambda block: -sum(p.numel() for p in block.parameters()))[:{count}])",
            "for key, child in lists.items():  # the offloading sees only the other blocks...",
            f"    setattr({component}, key, torch.nn.ModuleList([block for block in child if block not in resident]))",
            call_source("apply_group_offloading", [Expr(component, None)], kwargs),
            "for key, child in lists.items():  # ...then every block is back in its place",
            f"    setattr({component}, key, child)",
            "for block in resident:",
            f"    block.to({source(device)})",
        ]
    )
    imports = ("import torch", "from diffusers.hooks import apply_group_offloading")

    def run(pipe: Any) -> None:
        import torch
        from diffusers.hooks import apply_group_offloading

        exec(code, {"pipe": pipe, "torch": torch, "apply_group_offloading": apply_group_offloading})

    description = (
        f"partial offload of {name}: its {count} largest blocks stay on {device}, diffusers group-offloads the rest"
    )
    return Step("offload", description, code, run, imports)
