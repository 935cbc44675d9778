"""Several GPUs of one plan: how many, and the link their traffic crosses.

`--gpu "2x RTX 4090"` (or `--gpu` repeated) plans several cards of one model; the probe counts the
cards of this machine that match the one it plans for. What decides whether a second card helps is
the link between them (`Link`): NVLink, PCIe with peer-to-peer access, or PCIe through host memory
where the driver gives the cards no peer access (GeForce RTX 40 series). The probe reads the
link from NVML (active NVLinks, peer-to-peer status); a plan for cards it can't see takes it from
the datasheet table (`advisor/data/gpus.json`: ``nvlink_gbs`` where the card's form factor is
built with NVLink, ``peer_to_peer: false`` where the driver refuses it) and says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from advisor.errors import UsageError
from advisor.probe.hardware import GpuInfo, pcie_bandwidth


# Copies and collectives reach about 80% of a link's theoretical rate in practice (the PCIe figure
# `advisor.probe.target.PCIE_EFFICIENCY` uses for host->device copies; NCCL's all-to-all bus
# bandwidth on NVLink reaches about the same share).
LINK_EFFICIENCY = 0.8
# Without peer access each byte goes through pinned host memory (NCCL's SHM transport): over the
# sender's PCIe link into host memory, then over the receiver's out of it, pipelined in chunks. Two
# RTX 4090s on PCIe 4.0 x16 measured about 22 GB/s one way so (CUDA's p2pBandwidthLatencyTest with
# peer access off, https://github.com/NVIDIA/nccl/issues/814): 0.85 of what copies reach on the link.
THROUGH_HOST_SHARE = 0.85
MAX_GPUS = 64  # the most cards a plan has (NVL72 racks aside, 8 per node is the common most)

_COUNT = re.compile(r"^\s*(\d+)\s*[x×*]\s*(\S.*?)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Link:
    """What a plan's cards send each other over: its kind, what one card sends per second while the
    others send too (bytes/s, per direction), and where that figure comes from."""

    kind: str  # "nvlink", "pcie-p2p" or "host" (PCIe through host memory)
    bytes_per_s: float
    source: str

    def describe(self) -> str:
        what = {"nvlink": "NVLink", "pcie-p2p": "PCIe peer-to-peer", "host": "PCIe through host memory"}[self.kind]
        return f"{what}, {self.bytes_per_s / 1e9:.0f} GB/s per card ({self.source})"


def split_gpu_count(text: str) -> tuple[int, str]:
    """'2x RTX 4090' -> (2, 'RTX 4090'); a name without a count is one card."""
    found = _COUNT.match(text)
    if not found:
        return 1, text
    count = int(found[1])
    if not 1 <= count <= MAX_GPUS:
        raise UsageError(f"--gpu: {text!r} asks for {count} cards; give 1 to {MAX_GPUS}, e.g. --gpu '2x RTX 4090'")
    return count, found[2]


def joined_gpus(names: list[str] | str | None) -> str | None:
    """One `--gpu` value for the repeated flag: ['RTX 4090', 'RTX 4090'] -> '2x RTX 4090'. Cards of
    different models are refused: a plan's cards share one datasheet."""
    if names is None or isinstance(names, str):
        return names
    counted = [split_gpu_count(name) for name in names]
    models = {name.strip().lower() for _count, name in counted}
    if len(models) > 1:
        listed = " and ".join(repr(name) for _count, name in counted)
        raise UsageError(
            f"--gpu: {listed} are different cards; the advisor plans several cards of one model "
            "(e.g. --gpu '2x RTX 4090'), or plan for each card alone"
        )
    total = sum(count for count, _name in counted)
    return counted[0][1] if total == 1 else f"{total}x {counted[0][1]}"


def datasheet_link(key: str, sheet: dict[str, Any]) -> tuple[Link, str | None]:
    """The link between cards of datasheet entry `key`, and the assumption it rests on (None where the
    form factor fixes it: an SXM board's NVLink)."""
    pcie = pcie_bandwidth(sheet["pcie_generation"], sheet["pcie_width"]) or 0
    if sheet.get("nvlink_gbs"):
        link = Link("nvlink", sheet["nvlink_gbs"] * 1e9 * LINK_EFFICIENCY, f"{key} datasheet NVLink")
        return link, None
    if sheet.get("peer_to_peer") is False:
        link = Link("host", pcie * LINK_EFFICIENCY * THROUGH_HOST_SHARE, f"{key}: no peer access on GeForce drivers")
        return link, None
    link = Link("pcie-p2p", pcie * LINK_EFFICIENCY, f"PCIe {sheet['pcie_generation']} x{sheet['pcie_width']}")
    bridge = sheet.get("nvlink_bridge_gbs")
    assumed = f"link: {link.describe()}" + (
        f"; no NVLink bridge assumed (a {key} pair with one has {bridge} GB/s per direction)" if bridge else ""
    )
    return link, assumed


def probed_link(gpus: list[GpuInfo], sheet: dict[str, Any] | None) -> Link:
    """The link NVML shows between `gpus` (same model): NVLink where every card has active links (at
    the datasheet's NVLink rate, or the bridge's), else PCIe, peer-to-peer where every pair has peer
    access."""
    sheet = sheet or {}
    if all(g.nvlinks_active for g in gpus):
        rate = sheet.get("nvlink_gbs") or sheet.get("nvlink_bridge_gbs")
        if rate:
            return Link("nvlink", rate * 1e9 * LINK_EFFICIENCY, "NVML: NVLink active; rate from the datasheet")
    read = [g.pcie_bandwidth_bytes_per_s for g in gpus]
    if all(read):
        slowest, pcie = min(read), "PCIe from NVML"
    else:  # no reading (the torch fallback probe): the card's datasheet link
        slowest = pcie_bandwidth(sheet.get("pcie_generation", 4), sheet.get("pcie_width", 16)) or 0
        pcie = "PCIe from the datasheet (NVML gave none)"
    indices = {g.index for g in gpus}
    if all(g.peers is not None and indices - {g.index} <= set(g.peers) for g in gpus):
        return Link("pcie-p2p", slowest * LINK_EFFICIENCY, f"NVML: peer access; {pcie}")
    unknown = any(g.peers is None for g in gpus)
    said = "peer access unknown, taken as none" if unknown else "NVML: no peer access"
    return Link("host", slowest * LINK_EFFICIENCY * THROUGH_HOST_SHARE, f"{said}; {pcie}")
