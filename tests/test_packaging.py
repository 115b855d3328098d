"""Packaging stays in step with the tree: every package listed, requirements match pyproject."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO_ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower()


def test_every_package_folder_is_listed():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {"priorface"}
    for init in REPO_ROOT.rglob("__init__.py"):
        rel = init.parent.relative_to(REPO_ROOT)
        if (
            rel.parts
            and rel.parts[0] in ("tests", "build", "scripts")
            or any(p.startswith(".") for p in rel.parts)
        ):
            continue
        if rel.parts:
            found.add("priorface." + ".".join(rel.parts))
    assert found == listed, (
        f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"
    )


def test_requirements_txt_matches_runtime_dependencies():
    lines = [
        line
        for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    req = {_name(line) for line in lines}
    runtime = {_name(d) for d in PYPROJECT["project"]["dependencies"]}
    for extra in ("faces", "priors"):
        runtime |= {_name(d) for d in PYPROJECT["project"]["optional-dependencies"][extra]}
    assert req == runtime
    assert not req & {"torch", "torchvision", "torchaudio"}, "requirements.txt must not touch torch"


def test_comfy_registry_section():
    comfy = PYPROJECT["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "PriorFace"
    assert PYPROJECT["project"]["scripts"]["priorface"] == "priorface.cli:main"
