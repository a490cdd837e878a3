"""Run SQLAlchemy's own pool tests with this project's pool classes in the place of SQLAlchemy's.

The tests (``test/engine/test_pool.py``, ``test_reconnect.py``, ``test_logging.py``) come from
the sdist of the *installed* SQLAlchemy version, fetched once with
``pip download --no-deps --no-binary :all: SQLAlchemy==<version>`` into ``.cache/sqlalchemy/``
(ignored by git), and run by SQLAlchemy's own pytest plugin (its ``setup.cfg``: sqlite) in a
pytest process of their own, with ``sqla_conftest.py`` as their conftest. The outcome must be
exactly :data:`expected_failures.EXPECTED`: an unexpected failure fails the run, and so does an
expected failure that passes (strict xfail) or that no longer exists.

By hand: ``.venv/bin/python -m tests.sqlalchemy_suite.suite [MODE] [pytest args]`` (modes:
:data:`expected_failures.MODES`; ``FTP_SQLA_STOCK=1`` runs SQLAlchemy's own classes instead).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy

from .expected_failures import EXPECTED, MODES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CACHE = Path(os.environ.get("FTP_SQLA_CACHE", ROOT / ".cache" / "sqlalchemy"))

#: What is taken from the sdist: the three test modules and what they need to run.
SUITE = ("test/engine/test_pool.py", "test/engine/test_reconnect.py", "test/engine/test_logging.py")
SUPPORT = (
    "setup.cfg",  # [sqla_testing] requirement class, [db] default = sqlite
    "pyproject.toml",  # SQLAlchemy's pytest options (warnings as errors, markers)
    "test/__init__.py",
    "test/requirements.py",
    "test/engine/__init__.py",
)


def series() -> str:
    """The installed SQLAlchemy's release series ("2.0", "2.1"): the expected failures' key."""
    return ".".join(sqlalchemy.__version__.split(".")[:2])


def sdist(version: str = sqlalchemy.__version__) -> Path:
    """The sdist of ``version`` in the cache, downloaded from the package index if missing."""
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob(f"[sS][qQ][lL][aA]lchemy-{version}.tar.gz"))
    if found:
        return found[0]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
         "--no-binary", ":all:", "--dest", str(CACHE), f"SQLAlchemy=={version}"],
        check=True,
    )  # fmt: skip
    found = sorted(CACHE.glob(f"[sS][qQ][lL][aA]lchemy-{version}.tar.gz"))
    if not found:
        raise RuntimeError(f"pip download left no sdist of SQLAlchemy {version} in {CACHE}")
    return found[0]


def prepare(version: str = sqlalchemy.__version__) -> Path:
    """A directory holding the suite's files from the sdist, and this project's conftest."""
    target = CACHE / f"suite-{version}"
    conftest = target / "test" / "conftest.py"
    if not conftest.exists():
        staging = CACHE / f".staging-{version}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(sdist(version)) as archive:
            for member in archive.getmembers():
                _top, _, inside = member.name.partition("/")
                if inside in SUITE + SUPPORT and member.isfile():
                    source = archive.extractfile(member)
                    assert source is not None
                    (staging / inside).parent.mkdir(parents=True, exist_ok=True)
                    (staging / inside).write_bytes(source.read())
        missing = [name for name in SUITE + SUPPORT if not (staging / name).exists()]
        if missing:
            raise RuntimeError(f"the sdist of SQLAlchemy {version} lacks {missing}")
        shutil.copy(HERE / "sqla_conftest.py", staging / "test" / "conftest.py")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    else:
        shutil.copy(HERE / "sqla_conftest.py", conftest)  # the project's newest
    return target


@dataclass(frozen=True)
class Outcome:
    returncode: int
    output: str


def run(mode: str, *pytest_args: str, version: str = sqlalchemy.__version__) -> Outcome:
    """Run the suite in ``mode`` (see :data:`MODES`) in a pytest process of its own."""
    directory = prepare(version)
    expected = EXPECTED[series()][mode]
    env = {
        **os.environ,
        "FTP_SQLA_POOL_DEFAULTS": json.dumps(MODES[mode].pool_defaults),
        "FTP_SQLA_EXPECTED_FAILURES": json.dumps(expected),
    }
    command = [
        sys.executable, "-m", "pytest", *MODES[mode].paths, *MODES[mode].pytest_args,
        "-p", "no:fault_tolerant_pool",  # this project's plugin (database fixtures): not needed
        "-p", "no:cacheprovider", "-p", "no:randomly", "-q", "--tb=short", "-rfEX",
        "-o", "console_output_style=classic", *pytest_args,
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=directory, env=env, capture_output=True, text=True, timeout=600
    )
    return Outcome(done.returncode, done.stdout + done.stderr)


def main(argv: list[str]) -> int:
    modes = [argv.pop(0)] if argv and argv[0] in MODES else list(MODES)
    status = 0
    for mode in modes:
        outcome = run(mode, *argv)
        print(f"== SQLAlchemy {sqlalchemy.__version__} pool suite, {mode}")
        print(outcome.output)
        status = status or outcome.returncode
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
