"""Host time the hooks of two levers add, per layer or per weight tensor, for the estimate's constants.

- layerwise casting (`layerwise_casting_hook_host_s`, per hooked layer): diffusers'
  ``apply_layerwise_casting`` hooks call ``Module.to(dtype)`` before and after each layer runs;
- sequential offload (`sequential_offload_host_s_per_tensor`, per weight tensor): accelerate's
  ``cpu_offload`` puts an ``AlignDevicesHook`` on each module with weights of its own, which moves
  each of them in (``set_module_tensor_to_device``, a new Parameter each time) before the module
  runs and out to ``meta`` after (here executing on the CPU).

A forward through N small bf16 ``nn.Linear`` layers (a weight and a bias each) with the hooks,
against the same layers without, side by side, median of repeated runs, three rounds: the layers
are tiny, so what is left is the hooks' host work (on a GPU host each cast or move is also a kernel
launch or a synchronous copy, which the estimate costs by its bytes).

    python benchmarks/hook_host_cost.py [--layers 400] [--repeats 20]
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
    from diffusers.hooks import apply_layerwise_casting

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)

    def layers():
        return torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(args.layers)]).to(torch.bfloat16)

    def cast(model):
        apply_layerwise_casting(
            model, storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16, skip_modules_pattern=()
        )

    def offload(model):
        cpu_offload(model, execution_device=torch.device("cpu"))

    x = torch.randn(1, 8, dtype=torch.bfloat16)
    print(f"{'hooks':<22} {'per':<7} {'round':>5} {'plain us':>9} {'hooked us':>10} {'hooks us':>9}")
    for label, hook, units, per in [
        ("layerwise casting", cast, args.layers, "layer"),
        ("sequential offload", offload, 2 * args.layers, "tensor"),
    ]:
        plain, hooked = layers(), layers()
        hook(hooked)
        costs = []
        for round_ in range(3):
            a, b = _median_seconds(plain, x, args.repeats), _median_seconds(hooked, x, args.repeats)
            costs.append((b - a) / units)
            print(
                f"{label:<22} {per:<7} {round_:5} {a / units * 1e6:9.1f} {b / units * 1e6:10.1f} {costs[-1] * 1e6:9.1f}"
            )
        print(f"{label}: {statistics.median(costs) * 1e6:.1f} us per {per}, median of rounds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
