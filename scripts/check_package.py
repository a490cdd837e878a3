"""The package as it would be published: build it, check it, install it where nothing else is.

    .venv/bin/python scripts/check_package.py     # scripts/test.sh runs it after mypy

1. ``python -m build --no-isolation``: the sdist, then the wheel built *from that sdist* (so a
   file the sdist forgot fails here). No isolation: the build uses this environment's setuptools
   (the ``test`` extra brings the one ``[build-system]`` asks for, and ``trove-classifiers``, with
   which setuptools refuses a classifier PyPI does not know) instead of installing one into two
   throwaway environments, which cost 10-13 s more per run on this machine.
2. What each archive holds: every module of the package, ``py.typed``, the license, the
   changelog and the ``pytest11`` entry point; none of the repository's other files (tests,
   benchmarks, docs, virtual environments, caches).
3. ``twine check --strict`` on both (what PyPI would refuse: the README's rendering, metadata).
4. A fresh virtual environment with no extra: ``pip install`` the wheel (its dependencies come
   from the index or pip's cache), then import the package and ``fault_tolerant_pool.testing`` and
   every public name of both, there, with no driver and no pytest installed.

Any failure exits non-zero with the step's output. Nothing is written outside a temporary
directory except ``fault_tolerant_pool.egg-info`` (setuptools' own, ignored by git). That one is
deleted first: setuptools adds every file its ``SOURCES.txt`` lists to the next sdist, so a stale
one (left by an older MANIFEST.in) would ship files the current rules leave out (seen here). The
editable installs do not use it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "fault_tolerant_pool"
PLUGIN = "_fault_tolerant_pool_pytest"  # the pytest11 entry point: a module outside the package

#: Paths (inside an archive, after the top directory) that must never be shipped.
JUNK = re.compile(
    r"(^|/)(\.venv[^/]*|\.git|__pycache__|\.mypy_cache|\.ruff_cache|\.pytest_cache|\.cache|site|"
    r"build|dist|tests|bench|docs|demo|scripts)(/|$)|\.py[cod]$"
)

#: What the fresh environment runs: no driver, no pytest; every public name imports.
IMPORT_CHECK = f"""
import importlib.metadata as md, importlib.util, sys
missing = [m for m in ("asyncpg", "psycopg", "pytest", "greenlet") if importlib.util.find_spec(m)]
assert not missing, f"installed without extras, yet importable: {{missing}}"
import {PACKAGE}, {PACKAGE}.testing
from {PACKAGE} import *
from {PACKAGE}.testing import *
for module in ({PACKAGE}, {PACKAGE}.testing):
    for name in module.__all__:
        getattr(module, name)
version = md.version("{PACKAGE}")
assert version == {PACKAGE}.__version__, (version, {PACKAGE}.__version__)
plugins = [e.value for e in md.entry_points(group="pytest11") if e.name == "{PACKAGE}"]
assert plugins == ["{PLUGIN}"], plugins
print({PACKAGE}.__version__, "imports from", {PACKAGE}.__file__, "with", sorted(
    d.metadata["Name"] for d in md.distributions()))
"""


class CheckFailed(Exception):
    pass


def run(step: str, *command: str | Path, cwd: Path = ROOT) -> str:
    """Run a command; on failure raise with its output, which is otherwise kept quiet."""
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise CheckFailed(f"{step} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def modules() -> set[str]:
    """The package's files as the archives must hold them (relative to the project root)."""
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / PACKAGE).rglob("*.py")}
    return files | {f"{PACKAGE}/py.typed", f"{PLUGIN}.py"}


def check_sdist(path: Path) -> list[str]:
    with tarfile.open(path) as sdist:
        names = sdist.getnames()
    top = names[0].split("/")[0]
    inside = {n[len(top) + 1 :] for n in names if n.startswith(top + "/")}
    need = modules() | {"pyproject.toml", "PKG-INFO", "README.md", "LICENSE", "CHANGELOG.md"}
    problems = [f"sdist lacks {n}" for n in sorted(need - inside)]
    problems += [f"sdist ships {n}" for n in sorted(inside) if JUNK.search(n)]
    return problems


def check_wheel(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as wheel:
        names = set(wheel.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    need = modules() | {f"{info}/licenses/LICENSE"}
    problems = [f"wheel lacks {n}" for n in sorted(need - names)]
    problems += [
        f"wheel ships {n}"
        for n in sorted(names)
        if not (n.startswith((f"{PACKAGE}/", f"{info}/")) or n == f"{PLUGIN}.py") or JUNK.search(n)
    ]
    if f"{PACKAGE} = {PLUGIN}" not in entry_points:
        problems.append(f"wheel's entry points lack the pytest11 plugin:\n{entry_points}")
    return problems


def main() -> int:
    started = time.perf_counter()
    timings: list[str] = []

    def lap(step: str, since: float) -> float:
        now = time.perf_counter()
        timings.append(f"{step} {now - since:.1f} s")
        return now

    work = Path(tempfile.mkdtemp(prefix="ftp-package-"))
    try:
        t = started
        shutil.rmtree(ROOT / f"{PACKAGE}.egg-info", ignore_errors=True)
        dist = work / "dist"
        run("python -m build", sys.executable, "-m", "build", "--no-isolation", "-o", dist, ".")
        (sdist,) = dist.glob("*.tar.gz")
        (wheel,) = dist.glob("*.whl")
        problems = check_sdist(sdist) + check_wheel(wheel)
        if problems:
            raise CheckFailed("the archives are wrong:\n  " + "\n  ".join(problems))
        t = lap("build", t)

        run("twine check", sys.executable, "-m", "twine", "check", "--strict", sdist, wheel)
        t = lap("twine check", t)

        venv = work / "venv"
        run("python -m venv", sys.executable, "-m", "venv", "--without-pip", venv)
        python = venv / "bin" / "python"
        # This environment's pip installs into the fresh one (--python): no pip of its own to set
        # up there, which took 12 s here.
        run("pip install the wheel", sys.executable, "-m", "pip", "--python", python,
            "install", "-q", "--disable-pip-version-check", wheel)  # fmt: skip
        t = lap("fresh venv + pip install", t)

        report = run("importing in the fresh venv", python, "-I", "-c", IMPORT_CHECK, cwd=work)
        lap("imports", t)
    except CheckFailed as exc:
        print(f"package check: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"   {sdist.name} and {wheel.name}: contents, twine check --strict")
    print(f"   fresh venv: {report.strip()}")
    print(f"   {time.perf_counter() - started:.1f} s ({', '.join(timings)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
