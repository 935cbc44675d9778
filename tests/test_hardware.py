import json
import os
import subprocess
import sys

import pytest

from advisor.probe import hardware
from advisor.probe.hardware import (
    GpuInfo,
    format_cuda_driver_version,
    gpu_from_nvml_readings,
    pcie_bandwidth,
    probe_machine,
    quantization_backends,
)


# What NVML returns on an H100 SXM 80GB (nvidia-smi shows 81559MiB total), as nvidia-ml-py hands it over.
H100_READINGS = {
    "name": "NVIDIA H100 80GB HBM3",
    "uuid": "GPU-2f5cbb6c-8fd4-3d0c-5e0a-3c3b7c1a9e11",
    "memory_total": 81559 * 2**20,
    "memory_free": 81004 * 2**20,
    "memory_used": 555 * 2**20,
    "cuda_compute_capability": (9, 0),
    "max_pcie_link_generation": 5,
    "max_pcie_link_width": 16,
    "curr_pcie_link_generation": 1,  # links train down when idle; the max is what transfers get
    "curr_pcie_link_width": 16,
}


def test_nvml_readings_become_bytes_capability_and_bandwidth():
    gpu = gpu_from_nvml_readings(0, H100_READINGS)
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.memory_total_bytes == 85_520_809_984
    assert gpu.memory_free_bytes + gpu.memory_used_bytes == gpu.memory_total_bytes
    assert gpu.compute_capability == "9.0"
    assert (gpu.pcie_generation, gpu.pcie_width) == (5, 16)
    assert gpu.pcie_generation_current == 1
    # PCIe 5.0 x16: 32 GT/s x 16 lanes, 128b/130b coding -> about 63 GB/s per direction.
    assert gpu.pcie_bandwidth_bytes_per_s == pytest.approx(63.0e9, rel=0.01)


def test_nvml_readings_tolerate_unsupported_calls_and_bytes_names():
    readings = {**H100_READINGS, "name": b"Tesla T4", "cuda_compute_capability": None}
    del readings["max_pcie_link_generation"]
    gpu = gpu_from_nvml_readings(3, readings)
    assert gpu.index == 3 and gpu.name == "Tesla T4"
    assert gpu.compute_capability is None
    assert gpu.pcie_bandwidth_bytes_per_s is None


@pytest.mark.parametrize(("gen", "width", "gbps"), [(3, 16, 15.75), (4, 16, 31.5), (4, 8, 15.75), (5, 16, 63.0)])
def test_pcie_bandwidth(gen, width, gbps):
    assert pcie_bandwidth(gen, width) == pytest.approx(gbps * 1e9, rel=0.01)


def test_pcie_bandwidth_unknown():
    assert pcie_bandwidth(None, 16) is None
    assert pcie_bandwidth(9, 16) is None


def test_cuda_driver_version_format():
    assert format_cuda_driver_version(12040) == "12.4"
    assert format_cuda_driver_version(13000) == "13.0"
    assert format_cuda_driver_version(None) is None


def test_cuda_visible_devices_filters_like_cuda(monkeypatch):
    gpus = [gpu_from_nvml_readings(i, {**H100_READINGS, "uuid": f"GPU-{i}aaa"}) for i in range(3)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-0")
    assert [g.index for g in hardware._visible_only(gpus)] == [2, 0]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,7,2")  # CUDA stops at the first invalid entry
    assert [g.index for g in hardware._visible_only(gpus)] == [1]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert hardware._visible_only(gpus) == []


def _real_nvml_works() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


@pytest.mark.skipif(_real_nvml_works(), reason="this machine has a working NVML")
def test_probe_on_this_machine_reports_no_gpu_with_reason():
    profile = probe_machine()
    assert profile.gpus == []
    assert profile.gpu_source == "none"
    assert "no CUDA GPU" in profile.gpu_note and "NVML" in profile.gpu_note


def test_probe_without_nvml_package_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    monkeypatch.setattr(hardware, "nvidia_gpu_signs", lambda: True)  # a driver, but no NVML bindings
    monkeypatch.setattr(hardware, "installed_version", lambda name: None)  # and no torch to ask instead
    gpus, source, note, driver, cuda = hardware.probe_gpus()
    assert (gpus, source, driver, cuda) == ([], "none", None, None)
    assert "NVML unavailable" in note


def _meminfo_kib(key: str) -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux only")
def test_host_ram_and_cores_match_the_kernel():
    host = probe_machine().host
    assert host.ram_total_bytes == _meminfo_kib("MemTotal") * 1024
    assert 0 < host.ram_available_bytes <= host.ram_total_bytes
    assert host.swap_total_bytes == _meminfo_kib("SwapTotal") * 1024
    assert host.cpu_cores_logical == os.cpu_count()
    assert host.cpu_model


def test_hf_cache_location_honours_environment(monkeypatch, tmp_path):
    from advisor.probe.hub_cache import hub_cache_dir

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub_cache_dir() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub_cache_dir() == tmp_path / "cache"
    host = probe_machine().host
    assert host.hf_cache_dir == str(tmp_path / "cache")
    assert host.hf_cache_free_bytes > 0  # measured on the nearest existing parent


def test_software_versions_come_from_metadata():
    from importlib.metadata import version

    software = probe_machine().software
    assert software.packages["diffusers"] == version("diffusers")
    assert software.packages["optuna"] == version("optuna")
    assert set(software.quantization_backends) >= {"bitsandbytes", "torchao", "layerwise_fp8", "fp8_compute"}


def test_backends_follow_gpu_and_packages():
    packages = {"torch": "2.13.0", "bitsandbytes": "0.50.2", "torchao": "0.18.0"}
    h100 = gpu_from_nvml_readings(0, H100_READINGS)
    ampere = GpuInfo(0, "NVIDIA A100", 1, 1, 0, compute_capability="8.0")

    on_cpu = quantization_backends(packages, [])
    assert not on_cpu["bitsandbytes"].usable and "GPU" in on_cpu["bitsandbytes"].reason
    assert on_cpu["torchao"].usable and on_cpu["layerwise_fp8"].usable
    assert not on_cpu["fp8_compute"].usable

    on_h100 = quantization_backends(packages, [h100])
    assert on_h100["bitsandbytes"].usable and on_h100["fp8_compute"].usable

    on_a100 = quantization_backends(packages, [ampere])
    assert on_a100["bitsandbytes"].usable
    assert not on_a100["fp8_compute"].usable and "8.9" in on_a100["fp8_compute"].reason

    no_bnb = quantization_backends({"torch": "2.13.0"}, [h100])
    assert not no_bnb["bitsandbytes"].usable and "not installed" in no_bnb["bitsandbytes"].reason


def test_probe_imports_neither_torch_nor_diffusers():
    code = (
        "import sys, json; from advisor.probe.hardware import probe_machine; "
        "json.dumps(probe_machine().to_dict()); "
        "print(json.dumps(sorted(m for m in ('torch', 'diffusers', 'transformers', 'optuna') if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_installed_versions_agree_with_importlib_metadata_for_every_installed_distribution():
    """The versions read from the metadata folders' names are the ones importlib.metadata parses
    from each METADATA file; a distribution that isn't installed is None."""
    from importlib import metadata

    from advisor.packages import installed_versions

    names = sorted({d.metadata["Name"] for d in metadata.distributions()})
    assert len(names) > 20
    found = installed_versions([*names, "surely-not-installed-anywhere"])
    assert {name: found[name] for name in names} == {name: metadata.version(name) for name in names}
    assert found["surely-not-installed-anywhere"] is None


def test_installed_versions_see_a_folder_added_to_sys_path_after_the_first_call(tmp_path, monkeypatch):
    """Importing setuptools appends its _vendor folder to sys.path; the distributions there are
    installed from then on, as importlib.metadata says, although the folders were read before."""
    from importlib import metadata

    from advisor.packages import installed_versions

    assert installed_versions(["advisor-late-arrival"])["advisor-late-arrival"] is None
    (tmp_path / "advisor_late_arrival-1.2.3.dist-info").mkdir()
    (tmp_path / "advisor_late_arrival-1.2.3.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: advisor-late-arrival\nVersion: 1.2.3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert installed_versions(["advisor-late-arrival"])["advisor-late-arrival"] == "1.2.3"
    assert metadata.version("advisor-late-arrival") == "1.2.3"
