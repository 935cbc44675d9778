"""Host time diffusers' layerwise-casting hooks add per layer (`layerwise_casting_hook_host_s`).

A forward through N small bf16 ``nn.Linear`` layers with ``apply_layerwise_casting`` (fp8 storage)
against the same layers without hooks, side by side, median of repeated runs. The layers are tiny,
so what is left is the host's work per layer: the hooks' two ``Module.to(dtype)`` calls and the
registry's dispatch (on a CUDA host each cast is also a kernel launch).

    python benchmarks/layerwise_hook_cost.py [--layers 400] [--repeats 30]
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
    from diffusers.hooks import apply_layerwise_casting

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args(argv)

    def layers():
        return torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(args.layers)]).to(torch.bfloat16)

    plain, hooked = layers(), layers()
    apply_layerwise_casting(
        hooked, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16, skip_modules_pattern=()
    )
    x = torch.randn(1, 8, dtype=torch.bfloat16)
    print(f"{'round':>5} {'plain us/layer':>15} {'hooked us/layer':>16} {'hooks us/layer':>15}")
    costs = []
    for round_ in range(3):
        a, b = _median_seconds(plain, x, args.repeats), _median_seconds(hooked, x, args.repeats)
        costs.append((b - a) / args.layers)
        print(f"{round_:5} {a / args.layers * 1e6:15.1f} {b / args.layers * 1e6:16.1f} {costs[-1] * 1e6:15.1f}")
    print(f"\nhooks' host time per layer, median of rounds: {statistics.median(costs) * 1e6:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
