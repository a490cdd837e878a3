"""The pytest plugin costs a test session that uses none of its fixtures nothing.

It loads (through the ``pytest11`` entry point) in every test session of every project that
installs the package. Two pytest runs of a tiny test file, in subprocesses, one with the plugin
and one with ``-p no:fault_tolerant_pool``: with it, pytest must import no other module but the
plugin's own (none of the package, SQLAlchemy, OpenTelemetry, a driver), and do nothing the
other run does not (no process started, no directory made, no file written, no socket bound:
Python's audit events, recorded from before pytest starts).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

PLUGIN = "_fault_tolerant_pool_pytest"

RUN = r"""
import json, sys

events = []
WATCHED = {"subprocess.Popen", "os.posix_spawn", "os.fork", "os.exec", "os.system", "os.mkdir",
           "tempfile.mkdtemp", "tempfile.mkstemp", "socket.bind", "socket.connect",
           "os.rename", "os.remove", "shutil.rmtree"}

def hook(event, args):
    if event in WATCHED:
        events.append([event, repr(args)[:200]])
    elif event == "open" and isinstance(args[1], str) and set(args[1]) & set("wax+"):
        events.append([event, repr(args)[:200]])

sys.addaudithook(hook)
import pytest

code = pytest.main(sys.argv[2:])
plugin = sys.modules.get("_fault_tolerant_pool_pytest")
with open(sys.argv[1], "w") as out:
    json.dump({"code": int(code), "events": events, "modules": sorted(sys.modules),
               "plugin": plugin is not None}, out)
"""

TEST_FILE = """
def test_nothing_of_the_plugin():
    assert 1 + 1 == 2
"""


def _session(work: Path, *options: str) -> dict[str, object]:
    """One pytest session in ``work``; its audit events with random file names masked."""
    (work / "test_plain.py").write_text(TEST_FILE)
    (work / "pytest.ini").write_text("[pytest]\n")
    scratch = work / "tmp"
    scratch.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "TMPDIR": str(scratch),
        "FTP_TESTING_TMPDIR": str(scratch),
        "CI": "true",
    }
    env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    env.pop("PYTEST_ADDOPTS", None)
    result = work / "outcome.json"
    args = ["-q", "-p", "no:cacheprovider", "-p", "no:randomly", "test_plain.py", *options]
    subprocess.run(
        [sys.executable, "-c", RUN, str(result), *args], cwd=work, env=env, check=True, timeout=60
    )
    outcome: dict[str, object] = json.loads(result.read_text())
    assert outcome["code"] == 0, outcome
    left = sorted(p.name for p in scratch.iterdir())
    assert not left, f"the session left {left} in its TMPDIR; it did {outcome['events']}"
    random_names = re.compile(re.escape(str(scratch)) + r"/[^/']+")
    outcome["events"] = [[e, random_names.sub("<tmp>/<random>", a)] for e, a in outcome["events"]]
    return outcome


def test_the_plugin_imports_and_does_nothing_until_a_fixture_is_used(tmp_path: Path) -> None:
    loaded = _session(tmp_path)
    unloaded = _session(tmp_path, "-p", "no:fault_tolerant_pool")

    assert loaded["plugin"], "the pytest11 entry point did not load the plugin"
    assert not unloaded["plugin"]
    modules = loaded["modules"]
    assert isinstance(modules, list) and isinstance(unloaded["modules"], list)
    extra = sorted(set(modules) - set(unloaded["modules"]))
    assert extra == [PLUGIN], f"loading the plugin imported more than itself: {extra}"
    heavy = ("fault_tolerant_pool", "sqlalchemy", "opentelemetry", "asyncpg", "psycopg", "greenlet")
    assert not [m for m in modules if m.split(".")[0] in heavy]
    assert loaded["events"] == unloaded["events"], (
        "the plugin did something at load or collection time:\n"
        + json.dumps({"with": loaded["events"], "without": unloaded["events"]}, indent=1)
    )
