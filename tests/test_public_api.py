import subprocess
import sys

import advisor


def test_public_names_are_pinned_and_sorted():
    assert advisor.__all__ == sorted(advisor.__all__)
    assert (
        advisor.__all__
        == "AdvisorError ConfigError EstimateError HardwareError MachineProfile ModelError OptimizationConfig TuneError UsageError apply_config format_size load_config load_pipeline parse_size pipeline_kwargs probe_machine".split()
    )
    for name in advisor.__all__:
        assert getattr(advisor, name) is not None


def test_every_error_is_an_advisor_error():
    for name in advisor.__all__:
        obj = getattr(advisor, name)
        if name.endswith("Error"):
            assert issubclass(obj, advisor.AdvisorError)


def test_import_is_light():
    code = "import sys, advisor, advisor.cli; print(sorted(m for m in ('torch', 'diffusers', 'optuna', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
