"""The host RAM loading takes, measured on the real loader: what the estimate's loading term stands on.

`advisor.plan.estimate` charges loading only for what it converts: diffusers reads a shard
memory-mapped, and a component stored in the dtype it runs in keeps the file's pages (the kernel's
to drop, not the process's own memory), while a converted one is built anew. A model of ~70 MB is
saved and loaded in a fresh process, at its stored dtype and converted, and the process's own memory
(``RssAnon`` in /proc, Linux) is read before and after.
"""

import json
import subprocess
import sys
import textwrap

import pytest


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status"),
]

LOAD = textwrap.dedent(
    """
    import gc, json, sys
    import torch
    from diffusers import FluxTransformer2DModel

    def own_memory():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    before = own_memory()
    model = FluxTransformer2DModel.from_pretrained(sys.argv[1], torch_dtype=getattr(torch, sys.argv[2]))
    gc.collect()
    print(json.dumps({"grown": own_memory() - before, "bytes": sum(p.numel() * p.element_size() for p in model.parameters())}))
    """
)


@pytest.fixture(scope="module")
def stored_bf16(tmp_path_factory):
    import torch
    from diffusers import FluxTransformer2DModel

    folder = tmp_path_factory.mktemp("bf16-model")
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=128,
        num_attention_heads=4,
        joint_attention_dim=512,
        pooled_projection_dim=256,
        in_channels=64,
    )
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def load(folder, dtype: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", LOAD, str(folder), dtype], capture_output=True, text=True, check=True, timeout=600
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_loading_at_the_stored_dtype_takes_no_ram_of_its_own(stored_bf16):
    loaded = load(stored_bf16, "bfloat16")
    assert loaded["bytes"] > 50 * 2**20
    # The weights are the file's pages: the process's own memory grows by a small part of them.
    assert loaded["grown"] < 0.2 * loaded["bytes"], loaded


def test_a_converted_load_builds_the_weights_anew(stored_bf16):
    loaded = load(stored_bf16, "float32")  # bf16 on disk, fp32 in memory: every weight converted
    assert loaded["grown"] >= 0.9 * loaded["bytes"], loaded
