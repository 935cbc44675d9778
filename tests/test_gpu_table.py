"""The GPU datasheet table (advisor/data/gpus.json) obeys the rules datasheets and architectures do.

Nothing here copies a figure from the table: the checks are the relations every NVIDIA part of a
generation shares (which compute capability each architecture has, fp8 tensor cores from 8.9 on,
fp16 and bf16 tensor math at one rate from Ampere on, fp8 at twice it), sanity ranges that catch
unit slips (TB/s for GB/s, sparse for dense), and that the name NVML reports for each card finds
its own entry through `lookup_gpu`'s loose matching.
"""

import json

import pytest

from advisor.paths import DATA_DIR
from advisor.probe.target import _normal, gpu_table, lookup_gpu

RAW = json.loads((DATA_DIR / "gpus.json").read_text())
TABLE = gpu_table()

FIELDS = {
    "memory_gib": (int, float),
    "bf16_tflops": (int, float),
    "fp16_tflops": (int, float),
    "pcie_generation": int,
    "pcie_width": int,
    "compute_capability": str,
    "memory_bandwidth_gbs": (int, float),
    "generation": str,
    "source": str,
}
# CUDA compute capability -> architecture (CUDA C++ Programming Guide, compute capabilities table).
ARCHITECTURE = {
    (7, 0): "Volta",
    (7, 5): "Turing",
    (8, 0): "Ampere",
    (8, 6): "Ampere",
    (8, 9): "Ada",
    (9, 0): "Hopper",
}
BLACKWELL_MAJORS = {10, 12}
# PCIe generations each architecture's parts ship with.
PCIE_BY_ARCHITECTURE = {"Volta": {3}, "Turing": {3}, "Ampere": {4}, "Ada": {4}, "Hopper": {5}, "Blackwell": {5, 6}}

# The names NVML (nvidia-smi --query-gpu=name) reports, and the entry each must find.
NVML_NAMES = {
    "NVIDIA B200": "B200",
    "NVIDIA H200": "H200",
    "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA H100 80GB HBM3": "H100",
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA A100-SXM4-40GB": "A100",
    "NVIDIA A100-SXM4-80GB": "A100 80GB",  # the socket word between model and memory is dropped
    "NVIDIA A100-PCIE-40GB": "A100",
    "NVIDIA A100 80GB PCIe": "A100 80GB PCIe",
    "NVIDIA L40S": "L40S",
    "NVIDIA L40": "L40",
    "NVIDIA L20": "L20",
    "NVIDIA L4": "L4",
    "NVIDIA A40": "A40",
    "NVIDIA A10G": "A10G",
    "NVIDIA A10": "A10",
    "NVIDIA RTX 6000 Ada Generation": "RTX 6000 Ada",
    "NVIDIA RTX A6000": "RTX A6000",
    "NVIDIA RTX A4000": "RTX A4000",
    "NVIDIA GeForce RTX 5090": "RTX 5090",
    "NVIDIA GeForce RTX 5090 Laptop GPU": "RTX 5090 Laptop",
    "NVIDIA GeForce RTX 5080": "RTX 5080",
    "NVIDIA GeForce RTX 5080 Laptop GPU": "RTX 5080 Laptop",
    "NVIDIA GeForce RTX 5070 Ti": "RTX 5070 Ti",
    "NVIDIA GeForce RTX 5070 Ti Laptop GPU": "RTX 5070 Ti Laptop",
    "NVIDIA GeForce RTX 5070": "RTX 5070",
    "NVIDIA GeForce RTX 5070 Laptop GPU": "RTX 5070 Laptop",
    "NVIDIA GeForce RTX 5060 Ti": "RTX 5060 Ti",
    "NVIDIA GeForce RTX 5060": "RTX 5060",
    "NVIDIA GeForce RTX 4090": "RTX 4090",
    "NVIDIA GeForce RTX 4090 Laptop GPU": "RTX 4090 Laptop",
    "NVIDIA GeForce RTX 4080 SUPER": "RTX 4080 Super",
    "NVIDIA GeForce RTX 4080": "RTX 4080",
    "NVIDIA GeForce RTX 4080 Laptop GPU": "RTX 4080 Laptop",
    "NVIDIA GeForce RTX 4070 Ti SUPER": "RTX 4070 Ti Super",
    "NVIDIA GeForce RTX 4070 Ti": "RTX 4070 Ti",
    "NVIDIA GeForce RTX 4070 SUPER": "RTX 4070 Super",
    "NVIDIA GeForce RTX 4070": "RTX 4070",
    "NVIDIA GeForce RTX 4070 Laptop GPU": "RTX 4070 Laptop",
    "NVIDIA GeForce RTX 4060 Ti": "RTX 4060 Ti",
    "NVIDIA GeForce RTX 4060": "RTX 4060",
    "NVIDIA GeForce RTX 4060 Laptop GPU": "RTX 4060 Laptop",
    "NVIDIA GeForce RTX 4050 Laptop GPU": "RTX 4050 Laptop",
    "NVIDIA GeForce RTX 3090 Ti": "RTX 3090 Ti",
    "NVIDIA GeForce RTX 3090": "RTX 3090",
    "NVIDIA GeForce RTX 3080 Ti": "RTX 3080 Ti",
    "NVIDIA GeForce RTX 3080": "RTX 3080",
    "NVIDIA GeForce RTX 3070 Ti": "RTX 3070 Ti",
    "NVIDIA GeForce RTX 3070": "RTX 3070",
    "NVIDIA GeForce RTX 3060 Ti": "RTX 3060 Ti",
    "NVIDIA GeForce RTX 3060": "RTX 3060",
    "Tesla T4": "T4",
    "Tesla V100-SXM2-32GB": "V100",
    "Tesla V100-PCIE-16GB": "V100",
}
# What people type for --gpu (the golden and decision scenarios use these).
TYPED_NAMES = {
    "rtx3060": "RTX 3060",
    "3060": "RTX 3060",
    "4060": "RTX 4060",
    "4060 ti": "RTX 4060 Ti",
    "4090 laptop": "RTX 4090 Laptop",
    "A100": "A100",
    "A100 80GB": "A100 80GB",
    "A10": "A10",
    "H100": "H100",
    "L4": "L4",
    "T4": "T4",
}


def capability(entry: dict) -> tuple[int, int]:
    major, minor = entry["compute_capability"].split(".")
    return int(major), int(minor)


def test_about_names_every_field():
    about = RAW["_about"]
    for field in [*FIELDS, "fp8_tflops"]:
        if field != "source":
            assert field in about, field


@pytest.mark.parametrize("key", list(TABLE))
def test_entry_has_every_field_with_a_sane_type(key):
    entry = TABLE[key]
    assert set(entry) == {*FIELDS, "fp8_tflops"}, key
    for field, kind in FIELDS.items():
        assert isinstance(entry[field], kind) and not isinstance(entry[field], bool), (key, field)
    assert entry["fp8_tflops"] is None or (isinstance(entry["fp8_tflops"], (int, float)) and entry["fp8_tflops"] > 0)
    assert 4 <= entry["memory_gib"] <= 200
    assert 10 <= entry["bf16_tflops"] <= 5000
    assert 100 <= entry["memory_bandwidth_gbs"] <= 10_000
    assert entry["pcie_width"] in (8, 16)
    assert entry["source"].strip() and ("NVIDIA" in entry["source"] or "AWS" in entry["source"])


@pytest.mark.parametrize("key", list(TABLE))
def test_generation_matches_compute_capability(key):
    entry = TABLE[key]
    major, minor = capability(entry)
    expected = "Blackwell" if major in BLACKWELL_MAJORS else ARCHITECTURE.get((major, minor))
    assert expected is not None, f"{key}: unknown compute capability {entry['compute_capability']}"
    assert entry["generation"] == expected, key
    assert entry["pcie_generation"] in PCIE_BY_ARCHITECTURE[expected], key


@pytest.mark.parametrize("key", list(TABLE))
def test_fp8_only_from_compute_capability_8_9_and_twice_bf16(key):
    entry = TABLE[key]
    has_fp8_cores = capability(entry) >= (8, 9)
    assert (entry["fp8_tflops"] is not None) == has_fp8_cores, key
    if has_fp8_cores:
        assert entry["fp8_tflops"] >= entry["bf16_tflops"], key
        # Ada, Hopper and Blackwell tensor cores do fp8 at twice their bf16 rate (same accumulate).
        assert 1.9 <= entry["fp8_tflops"] / entry["bf16_tflops"] <= 2.1, key


@pytest.mark.parametrize("key", list(TABLE))
def test_fp16_and_bf16_tensor_rates_agree_from_ampere_on(key):
    entry = TABLE[key]
    if capability(entry) >= (8, 0):
        assert entry["fp16_tflops"] == pytest.approx(entry["bf16_tflops"], rel=0.03), key
    else:  # no bf16 before Ampere: the table gives the fp16 figure in bf16_tflops
        assert entry["fp16_tflops"] == entry["bf16_tflops"], key


@pytest.mark.parametrize("key", list(TABLE))
def test_flops_per_byte_is_plausible(key):
    """Dense bf16 FLOPs per byte of memory traffic: 30-600 for every GPU of these generations.

    Outside it, a figure is in the wrong unit (TB/s as GB/s) or sparse rather than dense.
    """
    entry = TABLE[key]
    assert 30 <= entry["bf16_tflops"] * 1000 / entry["memory_bandwidth_gbs"] <= 600, key


def test_laptop_parts_are_slower_than_their_desktop_namesakes():
    laptops = [key for key in TABLE if key.endswith(" Laptop")]
    assert {"RTX 4060 Laptop", "RTX 4070 Laptop", "RTX 4080 Laptop", "RTX 4090 Laptop"} <= set(laptops)
    for laptop in laptops:
        desktop = laptop.removesuffix(" Laptop")
        if desktop in TABLE:
            assert TABLE[laptop]["bf16_tflops"] < TABLE[desktop]["bf16_tflops"], laptop
            assert TABLE[laptop]["memory_bandwidth_gbs"] <= TABLE[desktop]["memory_bandwidth_gbs"], laptop


@pytest.mark.parametrize(
    "lineup",
    [
        ["RTX 3060", "RTX 3060 Ti", "RTX 3070", "RTX 3070 Ti", "RTX 3080", "RTX 3080 Ti", "RTX 3090", "RTX 3090 Ti"],
        ["RTX 4060", "RTX 4060 Ti", "RTX 4070", "RTX 4070 Super", "RTX 4070 Ti", "RTX 4070 Ti Super", "RTX 4080",
         "RTX 4080 Super", "RTX 4090"],
        ["RTX 4050 Laptop", "RTX 4060 Laptop", "RTX 4070 Laptop", "RTX 4080 Laptop", "RTX 4090 Laptop"],
        ["RTX 5060", "RTX 5060 Ti", "RTX 5070", "RTX 5070 Ti", "RTX 5080", "RTX 5090"],
        ["T4", "V100", "A100", "H100 PCIe", "H100", "B200"],
    ],
)
def test_a_higher_model_number_is_faster(lineup):
    rates = [TABLE[key]["bf16_tflops"] for key in lineup]
    assert rates == sorted(rates) and len(set(rates)) == len(rates), dict(zip(lineup, rates))


def test_normalised_keys_are_distinct():
    normal = [_normal(key) for key in TABLE]
    assert len(set(normal)) == len(normal)


@pytest.mark.parametrize("key", list(TABLE))
def test_every_key_finds_itself(key):
    assert lookup_gpu(key)[0] == key
    assert lookup_gpu(key.upper())[0] == key


def test_every_entry_has_an_nvml_name_here():
    assert set(NVML_NAMES.values()) == set(TABLE)


@pytest.mark.parametrize(("name", "key"), list(NVML_NAMES.items()))
def test_nvml_name_finds_its_entry(name, key):
    found = lookup_gpu(name)
    assert found is not None and found[0] == key, (name, found and found[0])


@pytest.mark.parametrize(("name", "key"), list(TYPED_NAMES.items()))
def test_typed_names_find_their_entry(name, key):
    assert lookup_gpu(name)[0] == key
