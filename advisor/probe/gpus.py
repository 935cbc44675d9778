"""The GPU datasheet table (advisor/data/gpus.json) and how a GPU's name finds its entry.

A name is read as words ('NVIDIA GeForce RTX 4090 Laptop GPU' -> rtx 4090 laptop): every word of an
entry must be in the name, and (strictly) every word of the name in the entry, so another product
('RTX 4090D', 'RTX 3060 Laptop') is refused instead of planned as its namesake; a memory the name
states picks the variant with it. GPUs of other makers are recognised, to say plainly that they are
not planned.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from advisor.paths import DATA_DIR


@lru_cache(maxsize=1)
def gpu_table() -> dict[str, dict[str, Any]]:
    return {k: v for k, v in json.loads((DATA_DIR / "gpus.json").read_text()).items() if not k.startswith("_")}


def _normal(name: str) -> str:
    """A GPU name without case, spaces, punctuation, brand and socket words: 'NVIDIA GeForce RTX 4090' ->
    'rtx4090', 'NVIDIA A100-SXM4-80GB' -> 'a10080gb' (the socket sits between model and memory)."""
    text = re.sub(r"[^a-z0-9]", "", re.sub(r"\bsxm\d*\b", "", name.lower()))
    for brand in ("nvidia", "geforce", "tesla"):
        text = text.replace(brand, "")
    return text


# How a GPU name is read (`_tokens`): the memory it states ("8GB", "16 GB", "24G") apart, then words
# split where letters meet digits ('RTX4090D' -> 4090, d). Brand words mean nothing; the socket and
# memory-type words (SXM4, HBM3) and 'PCIe' only pick a variant where an entry has them ('H100 PCIe').
_MEMORY_WORD = re.compile(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)\s*(?:gib|gb|g)(?![a-z0-9])")
_BRAND_WORDS = frozenset({"nvidia", "geforce", "tesla", "rtx", "gpu", "generation"})
# 'NVIDIA RTX PRO 6000 Blackwell Workstation Edition': the architecture and edition words name no other card.
_OPTIONAL_WORDS = frozenset({"pcie", "blackwell", "workstation", "edition"})
_SYNONYMS = {"mobile": "laptop"}  # NVIDIA says 'Laptop GPU' for what shops call 'Mobile'


@lru_cache(maxsize=256)
def _tokens(name: str) -> tuple[tuple[str, ...], float | None]:
    """The words of a GPU name, and the memory (GB) it states: 'NVIDIA A100-SXM4-80GB' -> (a, 100), 80."""
    text = name.lower()
    stated = _MEMORY_WORD.search(text)
    if stated:
        text = f"{text[: stated.start()]} {text[stated.end() :]}"
    text = re.sub(r"(?<![a-z])(?:sxm|hbm)\d*e?(?![a-z])", " ", text)
    words = re.findall(r"[a-z]+|\d+", text)
    return tuple(_SYNONYMS.get(w, w) for w in words if w not in _BRAND_WORDS), (float(stated[1]) if stated else None)


def memory_fits(memory_gib: float, stated_gib: float) -> bool:
    """Whether a card that reports `memory_gib` is the one sold as `stated_gib` GB: cards report up to
    10% less than they are sold with (ECC, reserved memory: a 24 GB L4 reports 22 GiB), never more."""
    return 0.9 * stated_gib <= memory_gib <= stated_gib + 0.5


def stated_memory_gib(name: str) -> float | None:
    """The memory a GPU name states ('RTX 4060 Ti 8GB' -> 8.0), or None."""
    return _tokens(name)[1]


def _candidates(name: str, memory_gib: float | None) -> list[tuple[tuple, str, tuple[str, ...]]]:
    """(rank, key, words of `name` the key lacks) for each entry whose words `name` has, best first."""
    wanted, stated = _tokens(name)
    memory = stated if stated is not None else memory_gib
    found = []
    for key, sheet in gpu_table().items():
        need, key_memory = _tokens(key)
        if not need or not set(need) <= set(wanted):
            continue
        extra = tuple(w for w in wanted if w not in need and w not in _OPTIONAL_WORDS)
        fits = memory is not None and memory_fits(sheet["memory_gib"], memory)
        # Fewest unexplained words, then the memory asked for, then an entry without memory in its name
        # ('A100 PCIe' is the 40 GB 'A100', not 'A100 80GB PCIe'), then the most specific ('H100 PCIe').
        found.append(((-len(extra), fits, key_memory is None, len(need)), key, extra))
    return sorted(found, key=lambda c: c[0], reverse=True)


def lookup_gpu(
    name: str, *, memory_gib: float | None = None, strict: bool = True
) -> tuple[str, dict[str, Any]] | None:
    """The datasheet entry for `name`, matched by words ('rtx3060', 'NVIDIA GeForce RTX 3060', '3060').

    Every word of the entry must be in the name ('4060' is not the RTX 4060 Ti), and, when `strict`,
    every word of the name in the entry: 'RTX 3060 Laptop', 'RTX 4090D' and 'GH200' are other cards
    than the RTX 3060, RTX 4090 and H200. Of memory variants, the one with the memory the name states
    ('RTX 4060 Ti 8GB'), else `memory_gib` (what NVML reports), else the entry without memory in its
    name; a stated memory no entry has still returns the model's entry (see `stated_memory_gib`).
    `strict=False` returns the nearest entry despite extra words (for a probed card with none of its own).
    """
    found = [c for c in _candidates(name, memory_gib) if not (strict and c[2])]
    return (found[0][1], gpu_table()[found[0][1]]) if found else None


def memory_variants(key: str) -> list[tuple[float, str]]:
    """(the memory its name states, entry) of the table's other entries for the same card with
    other memory ('RTX 4060 Ti' -> (8, 'RTX 4060 Ti 8GB')), smallest first."""
    words = _tokens(key)[0]
    return sorted(
        (_tokens(other)[1], other)
        for other in gpu_table()
        if other != key and _tokens(other)[0] == words and _tokens(other)[1] is not None
    )


def why_not_this_card(name: str) -> str:
    """Why `name` has no entry when an entry's words are all in it: ' ('Laptop' makes it another card than the RTX 3060)'."""
    found = _candidates(name, None)
    if not found:
        return ""
    _, key, extra = found[0]
    spelled = ["|".join([w, *(k for k, v in _SYNONYMS.items() if v == w)]) for w in extra]
    said = re.search(
        r"(?<![a-z])(?:" + ")[^a-z0-9]*(?:".join(spelled) + r")(?![a-z])", name, re.IGNORECASE
    )  # 'Max-Q' as written
    return f" ({said[0] if said else ' '.join(extra)!r} makes it another card than the {key})"


# GPUs of other makers, by the words their names use: the advisor plans NVIDIA CUDA GPUs and CPUs.
OTHER_MAKERS = {
    "an AMD GPU (ROCm)": r"\b(amd|radeon|instinct|mi\d{2,3}[a-z]?|rx\s?\d{3,4}\w*)\b",
    "an Apple GPU (Metal)": r"\b(apple|m[1-5](\s?(pro|max|ultra))?)\b",
    "an Intel GPU (XPU)": r"\b(intel|arc\s?[ab]\d{3}\w*|gaudi\s?\d?|data center gpu max)\b",
}


def other_maker(name: str) -> str | None:
    """Which other maker's GPU `name` is ("an AMD GPU (ROCm)"), or None."""
    return next((maker for maker, words in OTHER_MAKERS.items() if re.search(words, name, re.IGNORECASE)), None)


def near_gpu_names(name: str) -> list[str]:
    """Known GPU names that look like `name`, for an error message."""
    normal = {_normal(key): key for key in gpu_table()}
    import difflib  # only for a name it does not know: not on the fast path

    close = difflib.get_close_matches(_normal(name), list(normal), n=4, cutoff=0.5)
    contained = [
        key for norm, key in normal.items() if _normal(name) and (_normal(name) in norm or norm in _normal(name))
    ]
    namesakes = [key for _, key, _ in _candidates(name, None)]  # 'RTX 4060' for '4060 super'
    return list(dict.fromkeys([*namesakes, *contained, *(normal[c] for c in close)]))
