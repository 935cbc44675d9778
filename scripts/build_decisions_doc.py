"""Render the decision suite (tests/test_decisions.py) as docs/decisions.md: scenario, pick, peak, latency, why.

python scripts/build_decisions_doc.py
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "decisions.md"
INTRO = """# Decisions of `advisor recommend`

What the rule engine picks for {count} scenarios (model x card x RAM x budget x quality, image and
video, consumer and datacentre cards, Linux and Windows, one and many generations per process; a
CPU-only one is in the tests too). Each row's expectation is
written from diffusers' guidance, published numbers or physics and is checked by
`tests/test_decisions.py`; the pick, peak and latency columns are what the advisor predicts
(regenerate with `python scripts/build_decisions_doc.py`). Cards are planned from datasheets
(`advisor/data/gpus.json`); "assumed" values are said in the output and recorded in provenance.

**Quality policy** (`--quality`): `exact` never proposes lossy storage or compute; `balanced`
(default) only when nothing lossless fits or a lossy candidate is predicted at least 20% faster
than the best lossless one; `fast` takes the fastest. **Ties**: candidates within 5% of the
fastest are ordered by the guidance (images: no offload, model, group, sequential; video: no
offload, group, model, sequential), then lossless first, then less host RAM, then less VRAM.
**RAM**: a plan may use 90% of the available host RAM; above 85% of the machine's RAM it warns.

| scenario | card, RAM, budget, quality | expected (source) | pick | peak VRAM | host RAM | latency |
|---|---|---|---|---|---|---|
"""


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("test_decisions", ROOT / "tests" / "test_decisions.py")
    suite = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = suite  # dataclasses look their module up while the class is built
    spec.loader.exec_module(suite)
    from advisor.units import format_size

    rows = []
    for d in suite.DECISIONS:
        r = suite.decide(d)
        card = ", ".join(
            [
                d.card.get("gpu") or f"{d.card['vram'] / 2**30:.0f} GB card",
                f"{d.card['ram'] / 2**30:.0f} GB RAM" if "ram" in d.card else "RAM assumed",
            ]
            + ([f"budget {format_size(d.budget)}"] if d.budget else [])
            + ([d.card["os"]] if "os" in d.card else [])
            + ([f"{d.generations} generation(s) per process"] if d.generations else [])
            + [d.quality]
        )
        if r.best is None:
            pick, peak, ram, latency = "nothing fits: " + "; ".join(r.advice[:1]), "-", "-", "-"
        else:
            e = r.best.estimate
            pick, peak, ram, latency = (
                r.config.summary(),
                format_size(e.peak_vram_bytes),
                format_size(e.peak_ram_bytes),
                f"{e.latency_s:.1f}s",
            )
        rows.append(f"| `{d.name}` ({d.model}) | {card} | {d.expect} | {pick} | {peak} | {ram} | {latency} |")
    PAGE.write_text(INTRO.format(count=len(rows)) + "\n".join(rows) + "\n")
    print(f"wrote {len(rows)} decisions to {PAGE}")


if __name__ == "__main__":
    main()
