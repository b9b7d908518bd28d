"""The supported version ranges in pyproject.toml and the stacks CI installs agree: every torch /
triton that .ci/run pins lies inside the declared range (so CI tests what the package admits),
the GPU machine's stack (torch 2.11 + triton 3.6) is one of them, and torch 2.15 is refused at
install until it is tested."""
from __future__ import annotations

import re
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent


def _spec(name: str, extra: str | None = None):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["optional-dependencies"][extra] if extra else project["dependencies"]
    (spec,) = [Requirement(r).specifier for r in reqs if Requirement(r).name == name]
    return spec


def _ci_pins(name: str) -> set[str]:
    return set(re.findall(rf"\b{name}==([0-9][0-9.]*[0-9])", (ROOT / ".ci" / "run").read_text()))


def test_ci_tests_the_gpu_machine_stack():
    assert "2.11.0" in _ci_pins("torch") and "3.6.0" in _ci_pins("triton")


@pytest.mark.parametrize("name, extra", [("torch", None), ("triton", "triton")])
def test_every_version_ci_pins_is_admitted(name, extra):
    pins = _ci_pins(name)
    assert pins, f"no {name}==X pin found in .ci/run"
    spec = _spec(name, extra)
    assert all(spec.contains(v) for v in pins), f"{name} pins {sorted(pins)} outside pyproject's {spec}"


def test_torch_2_15_is_refused_at_install():
    """torch 2.15 is not supported yet (see the comment in pyproject.toml): pip must not pick it."""
    spec = _spec("torch")
    assert not spec.contains("2.15.0") and not spec.contains("2.15.1")
    assert spec.contains("2.14.1") and spec.contains("2.11.0")
