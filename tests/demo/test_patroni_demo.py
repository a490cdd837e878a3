"""The demo on a real Patroni cluster (``python -m demo --patroni``): its buttons' endpoints.

The app runs in-process on a throwaway :class:`PatroniCluster` (etcd, two Patroni nodes, HAProxy),
its engine on HAProxy's read-write port, with workers writing in a loop. "Switch over" (Patroni's
``POST /switchover``) must move the writes to the new leader, and the JSON the page polls
(``/health``) must say so: the writes per node (from ``inet_server_port()``) and the new leader.
Then "Kill the leader's postmaster": Patroni starts it again in place, and the writes carry on on
the same node. After each, the demo restores the cluster (healthy: a leader, a streaming replica,
HAProxy routing) before the next press.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from _fault_tolerant_pool_pytest import _require
from demo import Settings
from demo.patroni import PatroniDemo

from .helpers import running_app, wait_for_database

pytestmark = [pytest.mark.anyio, pytest.mark.db, pytest.mark.patroni]

WORKERS = 4
SWITCHOVER = {"x-demo-action": "switchover"}
KILL_LEADER = {"x-demo-action": "kill-leader"}


@dataclass(frozen=True)
class Write:
    started: float  # epoch seconds, like the actions' timestamps
    ended: float
    status: int
    body: dict[str, Any]


async def wait_for(
    client: httpx.AsyncClient, done: Callable[[dict[str, Any]], object], what: str
) -> Any:
    """Poll ``/health`` (what the page polls) until ``done(its Patroni part)``; that part."""
    database = await wait_for_database(client, lambda d: done(d["patroni"]), what, interval=0.1)
    return database["patroni"]


def finished(patroni: dict[str, Any], number: int) -> bool:
    """Whether the page's ``number``-th action is over: the cluster restored, or an error."""
    actions = patroni["actions"]
    if len(actions) < number:
        return False
    action = actions[number - 1]
    return action["restored_at"] is not None or action["error"] is not None


async def action_done(
    client: httpx.AsyncClient, number: int, what: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Wait until the page's ``number``-th action is over: the page and that action (which must
    have succeeded)."""
    page = await wait_for(client, lambda p: finished(p, number), what)
    action: dict[str, Any] = page["actions"][-1]
    assert action["error"] is None, action
    return page, action


async def test_switch_over_moves_the_writes_to_the_new_leader_and_the_page_shows_it() -> None:
    patroni = _require(PatroniDemo)  # ServerUnavailable without etcd, Patroni or HAProxy
    try:
        await asyncio.to_thread(patroni.start)
        old = patroni.leader
        assert old is not None
        (new,) = [node.name for node in patroni.cluster.nodes if node.name != old]
        url = patroni.url("asyncpg")
        assert f":{patroni.cluster.haproxy_port}/" in url  # HAProxy's read-write port by default
        settings = Settings(database_url=url, patroni=True)
        async with running_app(settings, patroni=patroni) as (app, client):
            writes: list[Write] = []
            stop = asyncio.Event()

            async def worker(n: int) -> None:
                i = 0
                while not stop.is_set():
                    i += 1
                    started = time.time()
                    response = await client.post("/notes/", json={"text": f"w{n}-{i}"})
                    writes.append(
                        Write(started, time.time(), response.status_code, response.json())
                    )
                    await asyncio.sleep(0.02)

            workers = [asyncio.create_task(worker(n)) for n in range(WORKERS)]
            try:
                # writes land on the leader, and the page's data says so
                page = await wait_for(
                    client, lambda p: p["writes"].get(old, 0) >= 20, "writes on the leader"
                )
                assert page["leader"] == old and page["route"] == "haproxy"
                assert page["last_write"]["node"] == old
                assert [n["name"] for n in page["nodes"] if n["leader"]] == [old]

                assert (await client.post("/_demo/switchover")).status_code == 403  # no header
                pressed = await client.post("/_demo/switchover", headers=SWITCHOVER)
                assert pressed.status_code == 202, pressed.text
                assert pressed.json() == {"action": 1, "kind": "switchover", "leader": old}
                busy = await client.post("/_demo/kill-leader", headers=KILL_LEADER)
                assert busy.status_code == 409 and "busy" in busy.json()["detail"]

                page, switchover = await action_done(client, 1, "the switchover and the restore")
                assert (switchover["from_node"], switchover["to_node"]) == (old, new)
                restored_at = switchover["restored_at"]
                # the writes move to the new leader, and the page's data reports it as leader
                on_new = page["writes"].get(new, 0)
                page = await wait_for(
                    client,
                    lambda p: p["leader"] == new and p["writes"].get(new, 0) >= on_new + 20,
                    "writes on the new leader",
                )
                assert page["busy"] is False and page["last_write"]["node"] == new
                nodes = {n["name"]: n for n in page["nodes"]}
                assert nodes[new]["leader"] and not nodes[old]["leader"]
                assert nodes[new]["role"] in ("master", "primary")
                assert nodes[old]["role"] == "replica"
                assert nodes[old]["writes"] >= 20 and nodes[new]["writes"] >= 20
                assert {n: nodes[n]["writes"] for n in nodes} == page["writes"]

                # the other button: the leader's postmaster is killed and started again in place
                killed = await client.post("/_demo/kill-leader", headers=KILL_LEADER)
                assert killed.status_code == 202, killed.text
                assert killed.json() == {"action": 2, "kind": "kill-leader", "leader": new}
                page, kill = await action_done(client, 2, "the kill and the restore")
                assert (kill["from_node"], kill["to_node"]) == (new, new)
                before = page["writes"].get(new, 0)
                page = await wait_for(
                    client,
                    lambda p: p["writes"].get(new, 0) >= before + 20,
                    "writes on the restarted leader",
                )
                assert page["leader"] == new
            finally:
                stop.set()
                await asyncio.gather(*workers)

            state = (await client.get("/health")).json()
            assert state["database"]["state"] == "running"
            failed = [w for w in writes if w.status != 201]
            landed = [w for w in writes if w.status == 201]
            print(
                f"\n{len(writes)} writes: {sum(w.body['server_node'] == old for w in landed)} on "
                f"{old}, {sum(w.body['server_node'] == new for w in landed)} on {new}, "
                f"{len(failed)} failed: {sorted({w.body.get('reason') for w in failed})}; "
                f"switch over {switchover['done_at'] - switchover['started_at']:.1f} s, "
                f"restored {restored_at - switchover['started_at']:.1f} s; "
                f"kill {kill['done_at'] - kill['started_at']:.1f} s, "
                f"restored {kill['restored_at'] - kill['started_at']:.1f} s"
            )
            # every write landed on a node the page knows, writable
            assert all(w.body["server_node"] in (old, new) for w in landed)
            assert all(w.body["server_in_recovery"] is False for w in landed)
            # once the cluster was restored after the switchover, every write went to the new
            # leader, until the kill
            settled = [
                w for w in writes if restored_at < w.started and w.ended < kill["started_at"]
            ]
            assert settled and all(
                w.status == 201 and w.body["server_node"] == new for w in settled
            ), [w for w in settled if w.status != 201 or w.body["server_node"] != new]
            # the faults cost clean 503s only (statements the demoted or killed server cut)
            for w in failed:
                assert w.status == 503, w
                assert w.body["reason"] in ("server_read_only", "connection_lost"), w.body
            assert app.state.demo.stats().give_ups == 0, "no checkout gave up"
    finally:
        await asyncio.to_thread(patroni.destroy)
