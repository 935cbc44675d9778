"""One process of a multi-GPU plan, rehearsed on the CPU: what ``torchrun`` would start on each GPU.

    python -m advisor.testing.distributed MODEL_DIR CONFIG.json OUT.npy [HEIGHT WIDTH STEPS]

run with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set (as
``torchrun`` sets them): it loads the tiny pipeline through ``advisor.load_pipeline`` (whose process
step joins the process group, on gloo without CUDA), makes one seeded image and, on rank 0, saves it.
Each rank also writes ``OUT.rankN.json``: the processes it ran among, the tokens the first
transformer block saw at each call (what context parallelism splits) and the seconds of the
generation. With HEIGHT WIDTH STEPS (the GPU kit's full-size runs) it generates that image instead
of the tiny one (decoded, as the estimate counts it), after one warm-up generation, and saves no image.

The CPU build of torch has no accelerator, and diffusers' ``_resolve_parallel_config`` picks each
rank's device as ``rank % torch.accelerator.device_count()``, a division by zero there; this runner
stands in a count of 1 (the mesh itself is built on "cpu" and runs on gloo). Nothing else differs
from a GPU run.
"""

from __future__ import annotations

import json
import os
import sys


def main(model_dir: str, config_path: str, out: str, *size: str) -> int:
    import time

    import numpy
    import torch

    from advisor import load_config, load_pipeline
    from advisor.testing import tiny_call_kwargs

    if not torch.cuda.is_available():
        torch.accelerator.device_count = lambda: 1  # see the module's docstring
    pipe = load_pipeline(model_dir, load_config(config_path), local_files_only=True)
    tokens = []
    first_block = pipe.transformer.transformer_blocks[0]
    first_block.register_forward_pre_hook(
        lambda _m, args, kwargs: tokens.append(kwargs["hidden_states"].shape[1]), with_kwargs=True
    )
    kwargs = tiny_call_kwargs("image", seed=0)
    if size:
        height, width, steps = (int(value) for value in size)
        kwargs.update(height=height, width=width, num_inference_steps=steps)  # the decode too: as the estimate
        pipe(**kwargs)  # warm-up: kernels chosen, caches filled
        tokens.clear()
    synchronize = torch.cuda.synchronize if torch.cuda.is_available() else lambda: None
    synchronize()
    started = time.perf_counter()
    image = pipe(**kwargs).images
    synchronize()
    seconds = time.perf_counter() - started
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0 and not size:
        numpy.save(out, image)
    processes = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    with open(f"{out}.rank{rank}.json", "w") as facts:
        json.dump({"processes": processes, "block_tokens": tokens, "seconds": seconds}, facts)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
