"""The version is written once (fault_tolerant_pool/_version.py) and read everywhere else."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

from packaging.version import Version

import fault_tolerant_pool

ROOT = Path(__file__).resolve().parents[2]


def test_the_installed_metadata_has_the_packages_version() -> None:
    # pyproject.toml's version is dynamic, read from _version.py at build time; an editable
    # install made before a bump shows the old one: reinstall (scripts/test.sh does).
    assert importlib.metadata.version("fault_tolerant_pool") == fault_tolerant_pool.__version__
    assert str(Version(fault_tolerant_pool.__version__)) == fault_tolerant_pool.__version__


def test_pyproject_writes_no_version_of_its_own() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    project = text.split("\n[project]\n", 1)[1].split("\n[", 1)[0]  # the table, to the next
    assert not re.search(r"^version\s*=", project, re.M), "pyproject.toml: a static version"
    assert re.search(r'^dynamic = \["version"\]', project, re.M)
    assert 'version = { attr = "fault_tolerant_pool._version.__version__" }' in text


def test_the_changelog_has_a_section_for_this_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    version = re.escape(fault_tolerant_pool.__version__)
    assert re.search(rf"^## \[{version}\] - \d{{4}}-\d{{2}}-\d{{2}}$", changelog, re.M), (
        f"CHANGELOG.md has no '## [{fault_tolerant_pool.__version__}] - YYYY-MM-DD' section"
    )
