"""Installability: pyproject.toml holds compatible ranges, constraints.txt the exact pins inside them, the
production install leaves the dev tools out, and the license file is the one the metadata declares."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def requirements() -> list[Requirement]:
    extras = PROJECT["optional-dependencies"]
    return [Requirement(line) for line in PROJECT["dependencies"] + [r for group in extras.values() for r in group]]


def pins() -> dict[str, str]:
    pinned: dict[str, str] = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pinned[canonicalize_name(name)] = version
    return pinned


def test_pyproject_has_ranges_and_constraints_pin_a_version_inside_each() -> None:
    pinned = pins()
    for requirement in requirements():
        operators = {spec.operator for spec in requirement.specifier}
        assert operators and not operators & {"==", "==="}, f"{requirement}: a range, not a pin"
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement.name} has no exact pin in constraints.txt"
        assert requirement.specifier.contains(pinned[name]), f"pin {name}=={pinned[name]} is outside {requirement}"


def test_compiled_model_runtime_stays_on_the_series_lleaves_supports() -> None:
    # lleaves 1.3 calls llvmlite's legacy pass manager, removed in 0.45: the range must not let 0.45 in.
    by_name = {canonicalize_name(r.name): r.specifier for r in requirements()}
    assert by_name["llvmlite"].contains("0.44.9") and not by_name["llvmlite"].contains("0.45.0")
    assert not by_name["lleaves"].contains("1.4.0")


def test_python_311_to_313_are_allowed() -> None:
    supported = SpecifierSet(PROJECT["requires-python"])
    assert all(supported.contains(v) for v in ("3.11.0", "3.12.0", "3.13.5"))
    assert not supported.contains("3.10.12")
    classifiers = set(PROJECT["classifiers"])
    assert {f"Programming Language :: Python :: 3.{minor}" for minor in (11, 12, 13)} <= classifiers


def make_commands(target: str) -> list[str]:
    """The commands `make TARGET` would run in a fresh clone (-B: as if nothing was installed yet)."""
    result = subprocess.run(
        ["make", "-n", "-B", target, "VENV=/nonexistent/venv", "PYTHON=python3"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    return result.stdout.splitlines()


def pip_installs(target: str) -> list[str]:
    return [line for line in make_commands(target) if " -m pip install " in line and "--upgrade pip" not in line]


def test_production_install_leaves_the_dev_tools_out() -> None:
    (install,) = pip_installs("install")
    assert "-c constraints.txt" in install and install.rstrip().endswith("-e .")
    # The README's first two commands on a fresh clone: the demo needs only production, the tests the rest.
    assert pip_installs("demo") == [install]
    (dev,) = pip_installs("test")
    assert "-c constraints.txt" in dev and '".[dev,dask]"' in dev


def test_license_file_is_the_declared_apache_license() -> None:
    assert PROJECT["license"] == {"text": "Apache-2.0"}
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
