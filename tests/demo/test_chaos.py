"""Issue 22: the demo's writes go through the transaction runner, so no write fails.

Ten writers post notes while the embedded database is restarted, failed over to its standby and
put through the chaos mix (every session terminated, a fast restart, a crash, every session
terminated again). A statement cut by any of them leaves nothing behind, so the runner runs the
insert again on a fresh connection and the request gets its 201. A write whose COMMIT was in
flight when the connection broke has an unknown outcome: the demo's insert carries a key of its
own, so it is run again too (``DEMO_IDEMPOTENT_WRITES=off``: the runner asks the server how the
COMMIT ended, and it answers ``503 outcome_unknown`` only when the server cannot say).
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from demo import Settings
from demo.embedded import CHAOS_STEPS, EmbeddedDatabase
from fault_tolerant_pool.testing import PostgresServer

from .helpers import running_app, wait_for_database

pytestmark = [pytest.mark.anyio, pytest.mark.db]

WRITERS = 10
PAUSE = 1.0  # seconds between the chaos mix's steps (the page's default is 5)
CALM = 0.5  # seconds of writes before, between and after the actions
#: Each insert takes this long on the server (a trigger), as a real service's unit of work does:
#: every fault then meets writes in flight, which the runner must run again.
INSERT_SECONDS = 0.05
SLOW_INSERTS = f"""
CREATE FUNCTION demo_notes_slowly() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep({INSERT_SECONDS}); RETURN NEW; END $$;
CREATE TRIGGER demo_notes_slowly BEFORE INSERT ON demo_notes
FOR EACH ROW EXECUTE FUNCTION demo_notes_slowly();
"""
#: The faults that close sessions (a failover does not: the writer turns read-only).
CLOSING = ("restart", "terminate", "crash")


@dataclass(frozen=True)
class Write:
    phase: str
    started: float
    ended: float
    status: int
    body: dict[str, Any]
    retry_after: str | None


def action(name: str) -> dict[str, str]:
    return {"x-demo-action": name}


@dataclass
class Run:
    writes: list[Write]
    health: dict[str, Any]
    stored: int
    retries: dict[str, int]  # re-runs counted during each phase


async def restart_failover_chaos(
    primary: PostgresServer, standby: PostgresServer, driver: str, idempotent: bool
) -> Run:
    """Ten writers in a loop through a restart, a failover and the chaos mix."""
    database = EmbeddedDatabase(primary, standby)
    database.state = "running"  # the fixtures started them
    settings = Settings(database_url=database.url(driver), idempotent_writes=idempotent)
    writes: list[Write] = []
    phase = ["calm"]
    retries: dict[str, int] = {}
    try:
        async with running_app(settings, database) as (app, client):
            await asyncio.to_thread(primary.execute, SLOW_INSERTS)  # the app made the table
            counted = [0]

            def enter(name: str) -> None:
                now = app.state.demo.stats().transaction_retries
                retries[phase[0]], counted[0] = now - counted[0], now
                phase[0] = name

            async def writer(n: int) -> None:
                i = 0
                while phase[0] != "done":
                    i += 1
                    started = time.time()
                    response = await client.post("/notes/", json={"text": f"{driver} w{n}-{i}"})
                    writes.append(
                        Write(phase[0], started, time.time(), response.status_code,
                              response.json(), response.headers.get("retry-after"))
                    )  # fmt: skip
                    await asyncio.sleep(0.01)

            async def begin(name: str, path: str, action_name: str) -> httpx.Response:
                """A calm spell, then phase ``name``: its action asked for and begun (202)."""
                await asyncio.sleep(CALM)
                enter(name)
                answer = await client.post(path, headers=action(action_name))
                assert answer.status_code == 202, answer.text
                return answer

            async def wait_for(done: Callable[[dict[str, Any]], object], what: str) -> None:
                await wait_for_database(client, done, what, timeout=60)

            async def operator() -> None:
                await begin("restart", "/_demo/restart-db?down_for=1", "restart-db")
                await wait_for(
                    lambda d: d["restarts"] and d["restarts"][-1]["started_at"]
                    and d["state"] == "running",
                    "the restart",
                )  # fmt: skip
                await begin("failover", "/_demo/failover?gap=0.5", "failover")
                await wait_for(
                    lambda d: d["failovers"] and d["failovers"][-1]["promoted_at"]
                    and d["state"] == "running",
                    "the failover",
                )  # fmt: skip
                answer = await begin("chaos", f"/_demo/chaos?pause={PAUSE}", "chaos")
                assert answer.json() == {
                    "chaos": 1, "pause": PAUSE, "port": standby.port,
                    "steps": ["terminate", "restart", "crash", "terminate"],
                }  # fmt: skip
                busy = await client.post("/_demo/chaos", headers=action("chaos"))
                assert busy.status_code == 409 and "busy" in busy.json()["detail"]
                busy = await client.post("/_demo/restart-db", headers=action("restart-db"))
                assert busy.status_code == 409
                await wait_for(lambda d: d["busy"] and d["chaos"]["running"], "the chaos mix begun")
                await wait_for(
                    lambda d: not d["chaos"]["running"] and not d["busy"]
                    and d["state"] == "running",
                    "the chaos mix",
                )  # fmt: skip
                await asyncio.sleep(CALM)
                enter("done")

            await asyncio.gather(operator(), *(writer(n) for n in range(WRITERS)))
            health = (await client.get("/health")).json()
            stored = (await client.get("/notes/", params={"limit": 1})).json()["count"]
    finally:
        database.destroy()
    return Run(writes, health, stored, retries)


def check_chaos_steps(run: Run, port: int) -> list[dict[str, Any]]:
    """The chaos mix ran its four steps on the writer (the promoted standby), each reported."""
    chaos = run.health["database"]["chaos"]
    steps: list[dict[str, Any]] = chaos["steps"]
    assert chaos["runs"] == 1 and chaos["running"] is False
    assert [s["kind"] for s in steps] == [kind for kind, _ in CHAOS_STEPS]
    for step in steps:
        assert step["run"] == 1 and step["port"] == port and step["error"] is None, step
        assert step["done_at"] >= step["started_at"] and step["detail"], step
    assert "sessions terminated" in steps[0]["detail"]
    assert steps[1]["detail"].startswith("accepting connections again")
    gaps = [b["started_at"] - a["done_at"] for a, b in itertools.pairwise(steps)]
    assert all(gap >= PAUSE for gap in gaps), gaps
    return steps


def summary(driver: str, run: Run) -> str:
    pool = run.health["pool"]
    failed = [w for w in run.writes if not 200 <= w.status < 300]
    by_phase = {p: sum(1 for w in run.writes if w.phase == p) for p in run.retries}
    return (
        f"\n{driver}: {len(run.writes)} writes {by_phase}, {len(failed)} not 2xx "
        f"{sorted({w.body.get('reason') for w in failed})}; writes run again "
        f"{pool['transaction_retries']} {run.retries}, COMMITs cut in flight "
        f"{pool['outcomes_unknown']}; chaos "
        f"{[s['detail'] for s in run.health['database']['chaos']['steps']]}"
    )


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
async def test_no_write_fails_through_restart_failover_and_chaos(
    pg_primary_standby: tuple[PostgresServer, PostgresServer], driver: str
) -> None:
    primary, standby = pg_primary_standby
    run = await restart_failover_chaos(primary, standby, driver, idempotent=True)
    print(summary(driver, run))
    check_chaos_steps(run, standby.port)
    pool = run.health["pool"]

    # Every write answered 2xx: 0 failed requests, by the client's count and the app's.
    failed = [w for w in run.writes if not 200 <= w.status < 300]
    assert not failed, failed
    assert all(phase in {w.phase for w in run.writes} for phase in ("calm", "restart", "chaos"))
    assert run.health["requests"]["unavailable"] == 0 and run.health["requests"]["errors"] == 0
    # The runner did the work: each fault cut writes, which were run again (this fails if the
    # writes bypass the runner, or if a fault never met a write in flight).
    for name in ("restart", "failover", "chaos"):
        assert run.retries[name] > 0, f"the {name} cut writes that were run again: {run.retries}"
    assert pool["transaction_retries"] >= sum(run.retries.values()) > 0
    assert pool["give_ups"] == 0
    # Each write answered 201 is stored exactly once, a COMMIT cut in flight included.
    landed = [w for w in run.writes if w.status == 201]
    assert len({w.body["id"] for w in landed}) == len(landed)
    assert run.stored == len(landed)
    assert all(w.body["server_in_recovery"] is False for w in landed)


async def test_without_idempotent_writes_a_cut_commit_is_an_unknown_outcome(
    pg_primary_standby: tuple[PostgresServer, PostgresServer],
) -> None:
    """``DEMO_IDEMPOTENT_WRITES=off``: a COMMIT cut in flight that the server cannot settle (a
    restart or a crash) is answered ``503 outcome_unknown`` (how many depends on the machine's
    timing; often none); every other write still gets its 201."""
    primary, standby = pg_primary_standby
    run = await restart_failover_chaos(primary, standby, "asyncpg", idempotent=False)
    print(summary("asyncpg, not idempotent", run))
    steps = check_chaos_steps(run, standby.port)
    pool = run.health["pool"]
    restart = run.health["database"]["restarts"][0]
    # When sessions were closed: the restart and the chaos mix's steps (not the failover).
    closing = [(restart["stopped_at"] - 0.5, restart["started_at"] + 1.0)] + [
        (s["started_at"] - 0.5, s["done_at"] + 1.0) for s in steps if s["kind"] in CLOSING
    ]

    unknown = [w for w in run.writes if not 200 <= w.status < 300]
    for w in unknown:  # only unknown outcomes, each where a fault closed the sessions
        assert w.status == 503 and w.body["reason"] == "outcome_unknown", w
        assert w.body["error"] == "outcome unknown" and "COMMIT" in w.body["detail"], w
        assert w.retry_after is None, "no Retry-After: sending it again may write it twice"
        assert any(a <= w.ended <= b for a, b in closing), (w, closing)
    assert pool["outcomes_unknown"] == len(unknown), "each counted once, by the pool"
    assert run.health["requests"]["unavailable"] == len(unknown)
    assert pool["transaction_retries"] > 0 and pool["give_ups"] == 0
    landed = [w for w in run.writes if w.status == 201]
    assert len(landed) <= run.stored <= len(landed) + len(unknown)


#: Cuts the COMMIT of the first ``CUTS`` notes whose text is 'cut': a deferred trigger (it runs
#: during COMMIT) terminates its own session. A sequence counts the cuts (it is not rolled back).
CUT_COMMITS = """
CREATE SEQUENCE demo_cuts;
CREATE FUNCTION demo_cut_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.body = 'cut' AND nextval('demo_cuts') <= {cuts} THEN
    PERFORM pg_terminate_backend(pg_backend_pid());
    PERFORM pg_sleep(5);
  END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER demo_cut_commit AFTER INSERT ON demo_notes
DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION demo_cut_commit();
"""


@pytest.mark.parametrize("idempotent", [True, False])
async def test_a_commit_cut_in_flight(pg_server: PostgresServer, idempotent: bool) -> None:
    settings = Settings(database_url=pg_server.url("asyncpg"), idempotent_writes=idempotent)
    async with running_app(settings) as (app, client):
        await asyncio.to_thread(pg_server.execute, CUT_COMMITS.format(cuts=1))
        response = await client.post("/notes/", json={"text": "cut"})
        health = (await client.get("/health")).json()
        pool = health["pool"]
        # Idempotent: run again without asking (counted unknown). Plain: the runner asks the
        # server, which ended the session before committing: settled, and run again.
        unknown, resolved = (1, 0) if idempotent else (0, 1)
        assert (pool["outcomes_unknown"], pool["outcomes_resolved"]) == (unknown, resolved)
        stored = pg_server.execute("SELECT count(*) FROM demo_notes WHERE body = 'cut'")
        # Run again either way: stored once, the 201 names it.
        assert response.status_code == 201, response.text
        assert pool["transaction_retries"] == 1
        assert health["requests"]["unavailable"] == 0
        assert stored == [("1",)]
        assert health["writes"] == {"idempotent": idempotent}
        metrics = (await client.get("/metrics")).text
        assert re.search(rf"^demo_pool_outcomes_unknown_total\{{.*\}} {unknown}\.0$", metrics, re.M)
        assert re.search(
            rf"^demo_pool_outcomes_resolved_total\{{.*\}} {resolved}\.0$", metrics, re.M
        )
        retried = 1
        assert re.search(
            rf"^demo_pool_transaction_retries_total\{{.*\}} {retried}\.0$", metrics, re.M
        )

        # A key already stored: the note an earlier run committed comes back, not a second one.
        from demo import db

        engine = app.state.demo.engine
        first = await db.add_note(engine, "keyed", request_key="k-1")
        again = await db.add_note(engine, "keyed", request_key="k-1")
        assert again["id"] == first["id"] and again["text"] == "keyed"
        assert pg_server.execute("SELECT count(*) FROM demo_notes WHERE body = 'keyed'") == [("1",)]


async def test_chaos_endpoint_is_guarded(pg_server: PostgresServer) -> None:
    database = EmbeddedDatabase(pg_server)
    database.state = "running"
    settings = Settings(database_url=pg_server.url("asyncpg"))
    async with running_app(settings, database) as (_, client):
        assert (await client.post("/_demo/chaos")).status_code == 403  # no header
        wrong = await client.post("/_demo/chaos", headers=action("restart-db"))
        assert wrong.status_code == 403
        too_fast = await client.post("/_demo/chaos?pause=0.1", headers=action("chaos"))
        assert too_fast.status_code == 422
        health = (await client.get("/health")).json()
        assert health["database"]["chaos"] == {"runs": 0, "running": False, "steps": []}
        assert health["database"]["busy"] is False
        assert health["pool"]["transaction_retries"] == 0
        assert health["pool"]["outcomes_unknown"] == 0
    async with running_app(settings, database, client_address=("192.0.2.7", 40000)) as (_, c):
        response = await c.post("/_demo/chaos", headers=action("chaos"))
        assert response.status_code == 403, "only from this machine"
    async with running_app(Settings(database_url=pg_server.url("asyncpg"))) as (_, c):
        response = await c.post("/_demo/chaos", headers=action("chaos"))
        assert response.status_code in (404, 405), "only a demo that runs its own database"
