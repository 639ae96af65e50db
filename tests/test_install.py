"""Installs are pinned: every dependency the package names has an exact version in
constraints.txt, and every install path (make, CI, Docker) uses that file."""

from __future__ import annotations

import re

import tomllib
from packaging.requirements import Requirement

from tests.conftest import REPO


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_every_dependency_and_extra_is_pinned():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    # gpu (flash-attn) builds only with CUDA: the lock is made on a CPU machine
    names = project["dependencies"] + [r for k, v in extras.items() if k != "gpu" for r in v]
    pins = _pins()
    for spec in names:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is not in constraints.txt: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"
        )


def test_make_ci_and_docker_install_with_the_constraints():
    makefile = (REPO / "Makefile").read_text()
    assert "CONSTRAINTS ?= constraints.txt" in makefile
    installs = [line for line in makefile.splitlines() if "pip install" in line or "PIP_INSTALL)" in line]
    assert installs and all("PIP_INSTALL" in line for line in installs), installs
    assert "make test" in (REPO / ".ci" / "run").read_text()
    docker_installs = [
        line for line in (REPO / "Dockerfile").read_text().splitlines() if "pip install" in line
    ]
    assert docker_installs and all("-c constraints.txt" in line for line in docker_installs)
