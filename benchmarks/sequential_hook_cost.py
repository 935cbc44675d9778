"""Host time accelerate's sequential-offload hooks add per weight tensor (`sequential_offload_host_s_per_tensor`).

``enable_sequential_cpu_offload`` runs ``accelerate.cpu_offload`` on every component: an
``AlignDevicesHook`` on each module with weights of its own moves each of them to the device before
the module runs (``set_module_tensor_to_device``, a new Parameter each time) and back to ``meta``
after. A forward through N small bf16 ``nn.Linear`` layers (two tensors each) with those hooks,
executing on the CPU, against the same layers without, side by side, median of repeated runs: the
layers are tiny, so what is left is the hooks' host work per tensor (on a GPU host each move is also
a synchronous copy from pageable memory, which the estimate costs by its bytes).

    python benchmarks/sequential_hook_cost.py [--layers 400] [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import time


def _median_seconds(model, x, repeats: int) -> float:
    import torch

    with torch.no_grad():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    import torch
    from accelerate import cpu_offload

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    def layers():
        return torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(args.layers)]).to(torch.bfloat16)

    plain, hooked = layers(), layers()
    cpu_offload(hooked, execution_device=torch.device("cpu"))
    tensors = 2 * args.layers  # weight and bias
    x = torch.randn(1, 8, dtype=torch.bfloat16)
    print(f"{'round':>5} {'plain us/tensor':>16} {'hooked us/tensor':>17} {'hooks us/tensor':>16}")
    costs = []
    for round_ in range(3):
        a, b = _median_seconds(plain, x, args.repeats), _median_seconds(hooked, x, args.repeats)
        costs.append((b - a) / tensors)
        print(f"{round_:5} {a / tensors * 1e6:16.1f} {b / tensors * 1e6:17.1f} {costs[-1] * 1e6:16.1f}")
    print(f"\nhooks' host time per weight tensor, median of rounds: {statistics.median(costs) * 1e6:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
