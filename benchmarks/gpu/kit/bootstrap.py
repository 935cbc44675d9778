"""Install the kit's packages with pip into a virtual environment, then re-run the kit there.

Two commands, both built as data (`venv_command`, `pip_install_command`) so tests can check them:

1. ``python3 -m venv --system-site-packages --clear [--without-pip] WORK/venv``: the environment
   sees the machine's own packages, so the GPU image's CUDA torch and transformers stay in use.
2. ``WORK/venv/bin/python -m pip --isolated install --no-index --find-links benchmarks/gpu/wheels
   --no-build-isolation --check-build-dependencies --constraint torch.txt --report report.json -e .``:
   pip resolves the project's requirements against what is installed and the carried wheels; nothing
   is downloaded. ``torch.txt`` pins torch to the installed version, so pip can never replace it.

Standard library only: this runs before anything is installed.
"""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, NoReturn

from kit import REPO


# Set for the re-run inside the environment: its folder, and the start time the budget counts from.
VENV_VARIABLE = "ADVISOR_GPU_KIT_VENV"
T0_VARIABLE = "ADVISOR_GPU_KIT_T0"
RECORD_NAME = "kit_install.json"
# Pinned to the installed version in the constraints file, and refused if pip's report lists it.
NEVER_REINSTALLED = ("torch",)
PIP_TIMEOUT_S = 600


class BootstrapError(RuntimeError):
    """The environment could not be made: the message says which step failed and why."""


@dataclass
class InstallRecord:
    """What the install step did, for the results (``install`` in gpu_kit.json)."""

    venv: str
    python: str  # the interpreter the environment was made from
    wheels: str | None  # the --find-links folder; None when absent
    parent_site_packages: list[str] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)
    installed: list[dict[str, str]] = field(default_factory=list)  # from pip's --report
    pip_warnings: list[str] = field(default_factory=list)
    install_s: float | None = None
    result: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def venv_command(venv: Path, *, python: str = sys.executable, with_pip: bool = False) -> list[str]:
    """The command that (re)creates `venv` on top of `python`'s packages.

    Without pip by default: the environment runs the parent's pip, which installs into the
    environment (``venv/bin/python -m pip``); that skips ensurepip, which some system Pythons lack.
    """
    command = [python, "-m", "venv", "--system-site-packages", "--clear"]
    if not with_pip:
        command.append("--without-pip")
    return [*command, str(venv)]


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def pip_install_command(venv: Path, wheels: Path | None, *, constraints: Path, report: Path) -> list[str]:
    """The pip command that installs the project (editable, from the repository root) into `venv`.

    ``--isolated`` (with ``PIP_CONFIG_FILE`` set to the null device, `pip_environment`) keeps a
    machine's pip configuration from adding indexes or find-links; ``--no-build-isolation`` builds
    the editable project with the installed setuptools, since an isolated build would download it,
    and ``--check-build-dependencies`` makes a setuptools older than pyproject's pin a clear error.
    """
    command = [str(venv_python(venv)), "-m", "pip", "--isolated", "install", "--no-index"]
    if wheels is not None:
        command += ["--find-links", str(wheels)]
    command += [
        "--no-build-isolation",
        "--check-build-dependencies",
        "--constraint",
        str(constraints),
        "--report",
        str(report),
        "--progress-bar",
        "off",
        "-e",
        ".",
    ]
    return command


def pip_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """`environ` without pip's own variables and with no pip configuration file."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # pip then reads no global, user or site file either
    return env


def never_reinstalled_constraints(installed: Callable[[str], str | None]) -> list[str]:
    """``name==version`` for each package in `NEVER_REINSTALLED` that is installed."""
    return [f"{name}=={version}" for name in NEVER_REINSTALLED if (version := installed(name)) is not None]


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def parent_site_packages() -> list[str]:
    """The running Python's site-packages that ``--system-site-packages`` alone would not show.

    When the running Python is itself a virtual environment (the GPU image's ``python3`` is
    ``/opt/torch/.venv/bin/python3``; here it is ``.venv``), a new environment's "system" packages
    are those of the base interpreter, not the running environment's: torch would be missing.
    """
    if sys.prefix == sys.base_prefix:
        return []
    return [p for p in site.getsitepackages() if Path(p).is_dir()]


def link_parent_site_packages(venv: Path, folders: list[str]) -> Path | None:
    """Make `folders` visible in `venv` after its own site-packages, with their .pth files processed."""
    if not folders:
        return None
    purelib = subprocess.run(
        [str(venv_python(venv)), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    pth = Path(purelib) / "_advisor_gpu_kit_parent.pth"
    # A .pth line that starts with "import" runs; addsitedir also reads the folder's own .pth files
    # (editable installs, namespace packages), which a plain path line would not.
    pth.write_text("".join(f"import site; site.addsitedir({folder!r})\n" for folder in folders))
    return pth


def pip_errors(output: str) -> tuple[list[str], list[str], list[str]]:
    """pip's ``ERROR:`` lines, the requirements it found no distribution for, and the conflicts it explains."""
    errors = [line.strip() for line in output.splitlines() if line.startswith("ERROR:")]
    missing = list(dict.fromkeys(re.findall(r"No matching distribution found for (\S+)", output)))
    conflicts = []
    for block in re.findall(r"The conflict is caused by:\n((?:[ \t]+\S.*\n?)+)", output):
        conflicts += [line.strip() for line in block.splitlines() if line.strip()]
    return errors, missing, conflicts


def installed_from_report(report: dict[str, Any]) -> list[dict[str, str]]:
    """Name, version and source of every distribution in pip's installation report."""
    rows = []
    for entry in report.get("install", []):
        info = entry.get("download_info") or {}
        editable = (info.get("dir_info") or {}).get("editable", False)
        rows.append(
            {
                "name": entry["metadata"]["name"],
                "version": entry["metadata"]["version"],
                "source": "project (editable)" if editable else info.get("url", "?").rsplit("/", 1)[-1],
            }
        )
    return rows


def make_environment(
    venv: Path, wheels: Path | None, *, project: Path = REPO, log: Callable[[str], None] = print
) -> InstallRecord:
    """Create `venv` and pip-install `project` into it from `wheels` and the installed packages.

    Raises `BootstrapError` with pip's errors (and, first, the requirements nothing satisfies) when
    pip cannot install, or when it would install a package of `NEVER_REINSTALLED`.
    """
    started = time.time()
    wheels = wheels if wheels is not None and wheels.is_dir() else None
    record = InstallRecord(venv=str(venv), python=sys.executable, wheels=str(wheels) if wheels else None)
    create = venv_command(venv, with_pip=find_spec("pip") is None)
    record.commands.append(create)
    done = subprocess.run(create, capture_output=True, text=True)
    if done.returncode != 0:
        raise BootstrapError(f"{' '.join(create)} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
    record.parent_site_packages = parent_site_packages()
    link_parent_site_packages(venv, record.parent_site_packages)
    constraints, report_path = venv / "never-reinstalled.txt", venv / "pip-report.json"
    constraints.write_text("".join(line + "\n" for line in never_reinstalled_constraints(installed_version)))
    install = pip_install_command(venv, wheels, constraints=constraints, report=report_path)
    record.commands.append(install)
    log("$ " + " ".join(install))
    done = subprocess.run(
        install, cwd=project, capture_output=True, text=True, env=pip_environment(), timeout=PIP_TIMEOUT_S
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        errors, missing, conflicts = pip_errors(output)
        found = (
            f"needs {', '.join(missing)}, which neither the installed packages nor {wheels or 'a wheels folder'} provide; "
            if missing
            else ""
        )
        if conflicts:
            found += "conflict: " + "; ".join(conflicts) + "; "
        raise BootstrapError(
            f"pip could not install the project ({done.returncode}): {found}"
            + ("; ".join(errors) or output.strip()[-800:])
        )
    record.installed = installed_from_report(json.loads(report_path.read_text()))
    replaced = [row["name"] for row in record.installed if row["name"].lower() in NEVER_REINSTALLED]
    if replaced:
        raise BootstrapError(f"pip installed {replaced} although the constraints pin the installed version")
    # After installing, pip reports installed packages that the new ones break, as ERROR lines too.
    record.pip_warnings = pip_errors(output)[0]
    record.install_s = round(time.time() - started, 2)
    record.result = "pip installed " + ", ".join(f"{r['name']} {r['version']}" for r in record.installed)
    return record


def in_environment() -> Path | None:
    """The kit's environment when this process is the re-run inside it, else None."""
    venv = os.environ.get(VENV_VARIABLE)
    if venv and Path(sys.prefix).resolve() == Path(venv).resolve():
        return Path(venv)
    return None


def rerun_in(venv: Path, record: InstallRecord, script: Path, argv: list[str], t0: float) -> NoReturn:
    """Replace this process with `script` run by the environment's Python (never returns)."""
    (venv / RECORD_NAME).write_text(json.dumps(record.to_dict(), indent=2))
    env = {**os.environ, VENV_VARIABLE: str(venv), T0_VARIABLE: repr(t0)}
    python = str(venv_python(venv))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(python, [python, str(script), *argv], env)


def recorded_install(venv: Path) -> dict[str, Any]:
    """The record the first run left in the environment before re-running the kit there."""
    path = venv / RECORD_NAME
    return json.loads(path.read_text()) if path.is_file() else {"venv": str(venv), "result": "re-run without a record"}
