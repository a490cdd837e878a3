"""conftest.py of the SQLAlchemy pool suite run (copied next to SQLAlchemy's own test files).

Loads SQLAlchemy's pytest plugin from the *installed* SQLAlchemy (as external dialects do), puts
this project's pool classes in the place of SQLAlchemy's (every ``pool.QueuePool``,
``pool.AsyncAdaptedQueuePool``, ``pool.NullPool`` a test names, and the dialects' default pool
class), and marks the docs' expected failures ``xfail(strict=True)``: a listed test that
starts passing fails the run, and so does a listed test that no longer exists.
"""

import importlib.util
import json
import os

import pytest

pytest.register_assert_rewrite("sqlalchemy.testing.assertions")

_spec = importlib.util.find_spec("sqlalchemy")
assert _spec is not None and _spec.origin is not None
bootstrap_file = os.path.join(
    os.path.dirname(_spec.origin), "testing", "plugin", "bootstrap.py"
)
with open(bootstrap_file) as f:
    code = compile(f.read(), "bootstrap.py", "exec")
    to_bootstrap = "pytest"
    exec(code, globals(), locals())
    from sqla_pytestplugin import *  # noqa: F403

import sqlalchemy  # noqa: E402
from sqlalchemy import pool as _pool  # noqa: E402

import fault_tolerant_pool  # noqa: E402

#: This project's keyword arguments the run gives every pool (the mode's; {} = the defaults).
POOL_DEFAULTS: dict[str, object] = json.loads(os.environ.get("FTP_SQLA_POOL_DEFAULTS", "{}"))


def _with_defaults(cls: type) -> type:
    """``cls`` with other defaults for this project's arguments (same name: same test ids)."""
    if not POOL_DEFAULTS:
        return cls

    def __init__(self, creator, *args, **kw):  # type: ignore[no-untyped-def]
        for name, value in POOL_DEFAULTS.items():
            kw.setdefault(name, value)
        cls.__init__(self, creator, *args, **kw)

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})


SUBSTITUTES = {
    "QueuePool": _with_defaults(fault_tolerant_pool.FaultTolerantQueuePool),
    "AsyncAdaptedQueuePool": _with_defaults(fault_tolerant_pool.FaultTolerantAsyncQueuePool),
    "NullPool": _with_defaults(fault_tolerant_pool.FaultTolerantNullPool),
}
if os.environ.get("FTP_SQLA_STOCK"):  # a control run: SQLAlchemy's own classes
    SUBSTITUTES = {}
for _name, _cls in SUBSTITUTES.items():
    setattr(_pool, _name, _cls)  # what ``from sqlalchemy import pool; pool.QueuePool`` finds
    setattr(sqlalchemy, _name, _cls)  # ``sqlalchemy.QueuePool``

_EXPECTED: dict[str, str] = json.loads(os.environ.get("FTP_SQLA_EXPECTED_FAILURES", "{}"))


_NOT_RUN = "not run: "


def pytest_collection_modifyitems(session, config, items):  # type: ignore[no-untyped-def]
    seen = set()
    deselected = []
    for item in list(items):
        reason = _EXPECTED.get(item.nodeid)
        if reason is None:
            continue
        seen.add(item.nodeid)
        if reason.startswith(_NOT_RUN):
            items.remove(item)
            deselected.append(item)
        else:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True, run=True))
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    missing = sorted(set(_EXPECTED) - seen)
    if missing:
        raise pytest.UsageError(
            "expected failures that match no collected test (renamed? fix the list): "
            + ", ".join(missing)
        )
