"""The GPU datasheet table (advisor/data/gpus.json) obeys the rules datasheets and architectures do.

Nothing here copies a figure from the table: the checks are the relations every NVIDIA part of a
generation shares (which compute capability each architecture has, fp8 tensor cores from 8.9 on,
fp16 and bf16 tensor math at one rate from Ampere on, fp8 at twice it), sanity ranges that catch
unit slips (TB/s for GB/s, sparse for dense), that the name NVML reports for each card finds its
own entry through `lookup_gpu`'s matching by words, and that a name stating a memory size or naming
another product (a laptop part, a 'D' edition) plans for that card or is refused, never for the
desktop card or another memory size.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from advisor.errors import UsageError
from advisor.paths import DATA_DIR
from advisor.probe.gpus import _normal, _tokens, gpu_table, lookup_gpu, memory_fits
from advisor.probe.hardware import GpuInfo, pcie_bandwidth
from advisor.probe.target import planned_target, target_from_probe
from advisor.units import GIB, parse_size


ROOT = Path(__file__).resolve().parent.parent


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
# Only where a card has them: a host link that is not PCIe, a superchip's own host memory.
OPTIONAL_FIELDS = {
    "host_link_gbs": (int, float),
    "host_memory_gib": (int, float),
    "nvlink_gbs": (int, float),
    "nvlink_bridge_gbs": (int, float),
    "peer_to_peer": bool,
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
    "NVIDIA GH200 480GB": "GH200",  # the superchip's Grace memory in the name, not the GPU's
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
    "NVIDIA RTX PRO 6000 Blackwell Workstation Edition": "RTX PRO 6000",
    "NVIDIA RTX PRO 6000 Blackwell Max-Q Workstation Edition": "RTX PRO 6000 Max-Q",
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
    "NVIDIA GeForce RTX 2080 Ti": "RTX 2080 Ti",
    "NVIDIA GeForce RTX 2080 SUPER": "RTX 2080 Super",
    "NVIDIA GeForce RTX 2080": "RTX 2080",
    "NVIDIA GeForce RTX 2070 SUPER": "RTX 2070 Super",
    "NVIDIA GeForce RTX 2070": "RTX 2070",
    "NVIDIA GeForce RTX 2060 SUPER": "RTX 2060 Super",
    "NVIDIA GeForce RTX 2060": "RTX 2060",
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
    for field in [*FIELDS, *OPTIONAL_FIELDS, "fp8_tflops"]:
        if field != "source":
            assert field in about, field


@pytest.mark.parametrize("key", list(TABLE))
def test_entry_has_every_field_with_a_sane_type(key):
    entry = TABLE[key]
    assert {*FIELDS, "fp8_tflops"} <= set(entry) <= {*FIELDS, *OPTIONAL_FIELDS, "fp8_tflops"}, key
    for field, kind in FIELDS.items():
        assert isinstance(entry[field], kind) and not isinstance(entry[field], bool), (key, field)
    for field in set(entry) & set(OPTIONAL_FIELDS):
        kind = OPTIONAL_FIELDS[field]
        assert isinstance(entry[field], kind) and (kind is bool or not isinstance(entry[field], bool)), (key, field)
    # NVLink per direction: faster than the card's PCIe link, at most NVLink 5's 900 GB/s (1.8 TB/s both ways)
    for field in ("nvlink_gbs", "nvlink_bridge_gbs"):
        if field in entry:
            assert pcie_bandwidth(entry["pcie_generation"], entry["pcie_width"]) / 1e9 < entry[field] <= 900, key
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
        [
            "RTX 4060",
            "RTX 4060 Ti",
            "RTX 4070",
            "RTX 4070 Super",
            "RTX 4070 Ti",
            "RTX 4070 Ti Super",
            "RTX 4080",
            "RTX 4080 Super",
            "RTX 4090",
        ],
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


# Memory variants NVML names alike: (name, memory NVML reports in GiB) -> entry.
NVML_MEMORY_VARIANTS = {
    ("NVIDIA GeForce RTX 3060", 12.0): "RTX 3060",
    ("NVIDIA GeForce RTX 3060", 8.0): "RTX 3060 8GB",
    ("NVIDIA GeForce RTX 4060 Ti", 16.0): "RTX 4060 Ti",
    ("NVIDIA GeForce RTX 4060 Ti", 8.0): "RTX 4060 Ti 8GB",
    ("NVIDIA GeForce RTX 3080", 10.0): "RTX 3080",
    ("NVIDIA GeForce RTX 3080", 12.0): "RTX 3080 12GB",
    ("NVIDIA A100-SXM4-40GB", 39.6): "A100",
    ("NVIDIA A100-SXM4-80GB", 80.0): "A100 80GB",
}
# The memory each card is sold with (GB), from its datasheet or spec page.
SOLD_WITH = {
    "B200": 180,
    "H200 NVL": 141,
    "GH200": 96,
    "H200": 141,
    "H100 NVL": 94,
    "H100 PCIe": 80,
    "H100": 80,
    "A100 80GB PCIe": 80,
    "A100 80GB": 80,
    "A100": 40,
    "L40S": 48,
    "L40": 48,
    "L20": 48,
    "L4": 24,
    "A40": 48,
    "A10G": 24,
    "A10": 24,
    "RTX PRO 6000": 96,
    "RTX PRO 6000 Max-Q": 96,
    "RTX 6000 Ada": 48,
    "RTX A6000": 48,
    "RTX A4000": 16,
    "RTX 5090 Laptop": 24,
    "RTX 5090": 32,
    "RTX 5080 Laptop": 16,
    "RTX 5080": 16,
    "RTX 5070 Ti Laptop": 12,
    "RTX 5070 Ti": 16,
    "RTX 5070 Laptop": 8,
    "RTX 5070": 12,
    "RTX 5060 Ti": 16,
    "RTX 5060": 8,
    "RTX 4090 Laptop": 16,
    "RTX 4090": 24,
    "RTX 4080 Super": 16,
    "RTX 4080 Laptop": 12,
    "RTX 4080": 16,
    "RTX 4070 Ti Super": 16,
    "RTX 4070 Ti": 12,
    "RTX 4070 Super": 12,
    "RTX 4070 Laptop": 8,
    "RTX 4070": 12,
    "RTX 4060 Ti": 16,
    "RTX 4060 Ti 8GB": 8,
    "RTX 4060 Laptop": 8,
    "RTX 4060": 8,
    "RTX 4050 Laptop": 6,
    "RTX 3090 Ti": 24,
    "RTX 3090": 24,
    "RTX 3080 Ti": 12,
    "RTX 3080": 10,
    "RTX 3080 12GB": 12,
    "RTX 3070 Ti": 8,
    "RTX 3070": 8,
    "RTX 3060 Ti": 8,
    "RTX 3060": 12,
    "RTX 3060 8GB": 8,
    "RTX 2080 Ti": 11,
    "RTX 2080 Super": 8,
    "RTX 2080": 8,
    "RTX 2070 Super": 8,
    "RTX 2070": 8,
    "RTX 2060 Super": 8,
    "RTX 2060": 6,
    "T4": 16,
    "V100": 32,
}
# Memory bus (bits) and data rate (Gbps per pin) of the GeForce memory variants: bandwidth = bits x rate / 8.
MEMORY_BUS = {
    "RTX 3060": (192, 15),
    "RTX 3060 8GB": (128, 15),
    "RTX 4060 Ti": (128, 18),
    "RTX 4060 Ti 8GB": (128, 18),
    "RTX 3080": (320, 19),
    "RTX 3080 12GB": (384, 19),
}


def test_every_entry_has_an_nvml_name_here():
    assert set(NVML_NAMES.values()) | set(NVML_MEMORY_VARIANTS.values()) == set(TABLE)


@pytest.mark.parametrize(("name_memory", "key"), list(NVML_MEMORY_VARIANTS.items()))
def test_nvml_memory_picks_the_memory_variant(name_memory, key):
    name, memory = name_memory
    assert lookup_gpu(name, memory_gib=memory)[0] == key


def test_every_entry_has_the_memory_it_is_sold_with():
    assert set(SOLD_WITH) == set(TABLE)
    for key, sold in SOLD_WITH.items():
        assert memory_fits(TABLE[key]["memory_gib"], sold), key  # a card reports up to 10% less than it is sold with
        stated = _tokens(key)[1]
        assert stated is None or stated == sold, key


@pytest.mark.parametrize("key", list(MEMORY_BUS))
def test_memory_variant_bandwidth_is_bus_width_times_data_rate(key):
    bits, gbps = MEMORY_BUS[key]
    assert TABLE[key]["memory_bandwidth_gbs"] == pytest.approx(bits * gbps / 8, rel=0.01)


def test_memory_variants_of_one_model_differ_in_memory_only_by_architecture():
    by_words = {}
    for key in TABLE:
        by_words.setdefault(_tokens(key)[0], []).append(key)
    variants = [keys for keys in by_words.values() if len(keys) > 1]
    assert {"RTX 3060", "RTX 3060 8GB"} in [set(k) for k in variants]
    for keys in variants:
        assert len({TABLE[k]["compute_capability"] for k in keys}) == 1, keys
        for a in keys:  # no card could be both: a stated memory picks one
            assert [b for b in keys if memory_fits(TABLE[b]["memory_gib"], SOLD_WITH[a])] == [a], (a, keys)


@pytest.mark.parametrize("key", list(TABLE))
def test_the_name_with_its_memory_plans_that_card(key):
    """'RTX 3060 12GB' and 'RTX 3060 8GB' are different cards; each, typed with its memory, is planned as itself."""
    typed = key if _tokens(key)[1] is not None else f"{key} {SOLD_WITH[key]}GB"
    target = planned_target(machine=None, gpu=typed, ram=64 * GIB, os="linux")
    assert target.vram_total_bytes == int(TABLE[key]["memory_gib"] * GIB), typed
    assert target.matmul_flops == TABLE[key]["bf16_tflops"] * 1e12
    assert target.name == (key if typed == key else typed) and target.source == f"--gpu {key} (datasheet), --ram"
    assert target.assumptions == ()


# What people type with a memory size, the entry it is, and the memory planned (GB).
TYPED_WITH_MEMORY = {
    "RTX 4060 Ti 8GB": ("RTX 4060 Ti 8GB", 8),
    "rtx 4060 ti 8 gb": ("RTX 4060 Ti 8GB", 8),
    "4060 Ti 16G": ("RTX 4060 Ti", 16),
    "RTX 3060 8GB": ("RTX 3060 8GB", 8),
    "RTX 3060 12 GiB": ("RTX 3060", 12),
    "A100 40GB": ("A100", 40),
    "A100 PCIe": ("A100", 40),  # PCIe alone does not make it the 80 GB PCIe card
    "A100-PCIE-40GB": ("A100", 40),
    "A100 80GB PCIe": ("A100 80GB PCIe", 80),
    "RTX 4090 Mobile": ("RTX 4090 Laptop", 16),  # NVIDIA's 'Laptop GPU'
}


@pytest.mark.parametrize(("typed", "expected"), list(TYPED_WITH_MEMORY.items()))
def test_a_stated_memory_picks_the_variant_with_it(typed, expected):
    key, sold = expected
    target = planned_target(machine=None, gpu=typed, ram=64 * GIB)
    assert lookup_gpu(typed)[0] == key
    assert memory_fits(target.vram_total_bytes / GIB, sold) and target.source.startswith(f"--gpu {key} ")
    assert target.name.startswith(key)  # the header and provenance.gpu_name say which card was planned


def test_a_stated_memory_no_entry_has_keeps_the_figures_and_says_so():
    target = planned_target(machine=None, gpu="RTX 4090 48GB", ram=64 * GIB, os="linux")
    assert target.vram_total_bytes == 48 * GIB and target.matmul_flops == TABLE["RTX 4090"]["bf16_tflops"] * 1e12
    assert target.name == "RTX 4090 with 48 GB"
    (said,) = target.assumptions
    assert "48 GB" in said and "RTX 4090" in said and "23.6 GB" in said


# Names of other products than the entry whose words they contain: (typed, the entry they are not).
OTHER_PRODUCTS = {
    "RTX 3060 Laptop": "RTX 3060",  # a 6 GB laptop part, not the 12 GB desktop card
    "NVIDIA GeForce RTX 3060 Laptop GPU": "RTX 3060",
    "RTX 3060 Mobile": "RTX 3060",
    "RTX 4090D": "RTX 4090",  # China's cut-down 4090 (fewer SMs)
    "RTX 4090 D": "RTX 4090",
    "RTX 3070 Max-Q": "RTX 3070",
    "NVIDIA RTX PRO 6000 Blackwell Server Edition": "RTX PRO 6000",  # passively cooled, its own power limits
    "4060 super": "RTX 4060",
}


@pytest.mark.parametrize(("typed", "not_key"), list(OTHER_PRODUCTS.items()))
def test_another_product_is_refused_not_planned_as_its_namesake(typed, not_key):
    assert lookup_gpu(typed) is None
    with pytest.raises(UsageError) as refused:
        planned_target(machine=None, gpu=typed, ram=64 * GIB)
    message = str(refused.value)
    assert message.startswith(f"--gpu: {typed!r} is not a known GPU") and "\n" not in message
    assert f"{not_key!r}" in message  # the near names


def test_a_grace_hopper_plans_its_hbm_its_grace_memory_and_its_nvlink_c2c():
    """NVML names the GH200 by the superchip's Grace memory ('GH200 480GB'): the GPU has 96 GB of HBM3,
    the host 480 GB of LPDDR5X behind NVLink-C2C (450 GB/s a direction, datasheet), not PCIe 5 x16's 64."""
    target = planned_target(machine=None, gpu="NVIDIA GH200 480GB", os="linux")
    assert target.vram_total_bytes == int(95.5 * GIB)
    assert target.ram_total_bytes == 480 * GIB and target.ram_assumed
    assert target.h2d_bytes_per_s == pytest.approx(450e9 * 0.8)  # copies reach ~80% of a link's peak
    assert any("480" in said and "GH200" in said for said in target.assumptions)
    pcie = planned_target(machine=None, gpu="H100 PCIe", ram=64 * GIB, os="linux")
    assert target.h2d_bytes_per_s > 5 * pcie.h2d_bytes_per_s


def test_the_refusal_says_which_word_makes_it_another_card():
    with pytest.raises(UsageError, match=r"\('Laptop' makes it another card than the RTX 3060\)"):
        planned_target(machine=None, gpu="RTX 3060 Laptop")
    with pytest.raises(UsageError, match=r"\('Max-Q' makes it another card than the RTX 3070\)"):
        planned_target(machine=None, gpu="RTX 3070 Max-Q")


@pytest.mark.parametrize("size", ["1.5GB", "0.5GB", "24GB", "12GB", "1.25GB", "750MB", "2.2GB"])
def test_vram_name_reads_back_as_the_size_given(size):
    """`--vram 1.5GB` is 'GPU with 1.5 GB', never a size rounded to another ('2 GB', '0 GB')."""
    target = planned_target(machine=None, vram=parse_size(size), ram=64 * GIB)
    shown = target.name.removeprefix("GPU with ")
    assert shown != target.name and parse_size(shown) == pytest.approx(parse_size(size), rel=1e-3)
    assert "." not in shown or not shown.split(" ")[0].endswith("0")  # no trailing zeros


def test_vram_that_is_not_the_cards_memory_is_allowed_and_said():
    """--gpu H100 --vram 24GB: a MIG slice or a capped card; the H100's compute, 24 GB, and a line saying so."""
    target = planned_target(machine=None, gpu="H100", vram=24 * GIB, ram=64 * GIB, os="linux")
    assert target.vram_total_bytes == 24 * GIB and target.matmul_flops == TABLE["H100"]["bf16_tflops"] * 1e12
    assert target.name == "H100 with 24 GB"
    (said,) = target.assumptions
    assert "--vram 24 GB" in said and "H100" in said and "79.6 GB" in said
    own = planned_target(machine=None, gpu="H100", vram=80 * GIB, ram=64 * GIB, os="linux")
    assert own.assumptions == ()  # the H100's own


def test_recommend_header_and_provenance_name_the_card_planned(capsys, monkeypatch):
    from advisor.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["recommend", "-m", "flux-dev", "--gpu", "rtx 4060 ti 8gb", "--ram", "32GB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["hardware"]["name"] == data["config"]["provenance"]["gpu_name"] == "RTX 4060 Ti 8GB"
    assert memory_fits(data["hardware"]["vram_total_bytes"] / GIB, 8)
    assert main(["recommend", "-m", "flux-dev", "--gpu", "rtx 4060 ti 8gb", "--ram", "32GB"]) == 0
    assert "| RTX 4060 Ti 8GB |" in capsys.readouterr().out.splitlines()[0]


def _probed(name: str, memory_gib: float) -> SimpleNamespace:
    memory = int(memory_gib * GIB)
    gpu = GpuInfo(
        index=0,
        name=name,
        memory_total_bytes=memory,
        memory_free_bytes=memory,
        memory_used_bytes=0,
        compute_capability="8.6",
    )
    return SimpleNamespace(gpus=[gpu], host=SimpleNamespace(ram_total_bytes=64 * GIB, ram_available_bytes=64 * GIB))


def test_probed_card_without_an_entry_uses_the_nearest_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no calibration
    target = target_from_probe(_probed("NVIDIA GeForce RTX 3060 Laptop GPU", 6.0))
    assert target.matmul_flops == TABLE["RTX 3060"]["bf16_tflops"] * 1e12  # not the default RTX 4090's
    assert "datasheet RTX 3060 (the nearest entry" in target.source and target.vram_total_bytes == 6 * GIB


def test_probed_memory_picks_the_variants_bandwidth(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    small = target_from_probe(_probed("NVIDIA GeForce RTX 3060", 8.0))
    large = target_from_probe(_probed("NVIDIA GeForce RTX 3060", 12.0))
    assert small.memory_bytes_per_s / large.memory_bytes_per_s == pytest.approx(128 / 192, rel=0.01)  # bus widths
    assert "datasheet RTX 3060 8GB" in small.source


@pytest.mark.parametrize(("name", "key"), list(NVML_NAMES.items()))
def test_nvml_name_finds_its_entry(name, key):
    found = lookup_gpu(name)
    assert found is not None and found[0] == key, (name, found and found[0])


@pytest.mark.parametrize(("name", "key"), list(TYPED_NAMES.items()))
def test_typed_names_find_their_entry(name, key):
    assert lookup_gpu(name)[0] == key


@pytest.mark.parametrize(
    ("gpu", "planned_gb", "other", "other_gb"),
    [("RTX 4060 Ti", 16, "RTX 4060 Ti 8GB", 8), ("RTX 3060", 12, "RTX 3060 8GB", 8), ("A100", 40, "A100 80GB", 80)],
)
def test_a_card_sold_with_more_than_one_memory_says_which_it_planned(gpu, planned_gb, other, other_gb):
    """'RTX 4060 Ti' is sold with 16 GB and with 8 GB: a plan for the bare name takes the entry
    without memory in its name, and says so, naming the flag for the other one; a name that states
    its memory, or a card sold with one memory only, assumes nothing about it."""
    target = planned_target(machine=None, gpu=gpu)
    said = [a for a in target.assumptions if a.startswith("memory:")]
    assert said == [
        f"memory: the {planned_gb} GB {gpu} (it is also sold with {other_gb} GB: --gpu {other!r} plans that one)"
    ]
    assert memory_fits(target.vram_total_bytes / GIB, planned_gb)
    assert not [a for a in planned_target(machine=None, gpu=other).assumptions if a.startswith("memory:")]
    assert not [a for a in planned_target(machine=None, gpu="RTX 4090").assumptions if a.startswith("memory:")]


def test_the_gpu_page_is_current():
    """docs/gpus.md lists every card --gpu knows (scripts/build_gpu_doc.py): the error for an unknown
    name points there instead of listing them all."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_gpu_doc", ROOT / "scripts" / "build_gpu_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = module.PAGE.read_text()
    for name in gpu_table():
        assert f"| {name} |" in page, f"run python scripts/build_gpu_doc.py ({name} missing)"


@pytest.mark.parametrize(
    ("name", "maker"),
    [
        ("MI300X", "AMD"),
        ("AMD Instinct MI250", "AMD"),
        ("Radeon RX 7900 XTX", "AMD"),
        ("Apple M3 Max", "Apple"),
        ("M2 Ultra", "Apple"),
        ("Intel Arc A770", "Intel"),
    ],
)
def test_other_makers_gpus_are_refused_plainly(name, maker):
    """ROCm, Metal and XPU devices run other kernels, quantizers and offload paths than the CUDA ones
    every plan names: one short line saying so, not the list of known cards, nor --vram advice."""
    with pytest.raises(UsageError) as refused:
        planned_target(machine=None, gpu=name)
    line = str(refused.value)
    assert maker in line and "NVIDIA CUDA" in line and "known:" not in line and len(line) < 250, line


def test_an_unknown_name_lists_a_few_cards_not_all():
    with pytest.raises(UsageError) as refused:
        planned_target(machine=None, gpu="Quadro Z9")
    line = str(refused.value)
    assert "docs/gpus.md" in line and len(line) < 250, line
