"""The GPU kit's modules (docs/gpu-kit.md); ``benchmarks/gpu/run_kit.py`` is the entry script.

- `bootstrap`: a virtual environment over the machine's packages, and pip installing the project
  into it from the carried wheels; then the kit re-runs itself there.
- `advisor_api`: every call into the `advisor` package, and the GPU-only facts the kit decides itself.
- `machine`: the environment child (versions, bitsandbytes smoke test, calibration) and
  bitsandbytes' native library.
- `flux_shaped`: the FLUX.1-dev-shaped pipeline with random weights, at a reduced depth.
- `plan`: the items, the time budget, measuring one item.
- `parts`: seed, recommend, tune and offload.
- `report`: the log, the table, the findings and the JSON.

Standard library only at import time: every module but the child functions and the parts imports
heavy packages inside its functions, so ``run_kit.py`` can start before anything is installed.
"""

from pathlib import Path


KIT_DIR = Path(__file__).resolve().parent.parent  # benchmarks/gpu
REPO = KIT_DIR.parent.parent
RUN_KIT = KIT_DIR / "run_kit.py"
WHEELS = KIT_DIR / "wheels"
GIB = 2**30
