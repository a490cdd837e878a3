"""Running the demo for tests: in-process over httpx, or ``python -m demo`` as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from demo import Settings, create_app
from demo.embedded import EmbeddedDatabase
from demo.patroni import PatroniDemo

ROOT = Path(__file__).resolve().parents[2]


@contextlib.asynccontextmanager
async def running_app(
    settings: Settings,
    database: EmbeddedDatabase | None = None,
    client_address: tuple[str, int] = ("127.0.0.1", 50000),
    *,
    patroni: PatroniDemo | None = None,
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan run, and an httpx client talking ASGI to it."""
    app = create_app(settings, database=database, patroni=patroni)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=client_address)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://demo", timeout=60
        ) as client:
            yield app, client


async def wait_for_database(
    client: httpx.AsyncClient,
    done: Callable[[dict[str, Any]], object],
    what: str,
    timeout: float = 30,
    interval: float = 0.05,
) -> Any:
    """Poll ``/health`` (what the page polls) until ``done(its database part)``; that part."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        database = (await client.get("/health")).json()["database"]
        if done(database):
            return database
        await asyncio.sleep(interval)
    raise AssertionError(f"{what} did not happen: {database}")


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


@dataclass
class DemoProcess:
    """``python -m demo`` running as a child; its output is collected by a thread."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    base_url: str = ""

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def banner_value(self, key: str) -> str:
        match = re.search(rf"^  {key}\s+(.*)$", self.output, re.MULTILINE)
        assert match, f"no {key!r} line in the demo's banner:\n{self.output}"
        return match.group(1).strip()

    def stop(self, sig: signal.Signals = signal.SIGINT, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"demo did not stop on {sig.name}:\n{self.output}") from None


def demo_command(*args: str) -> list[str]:
    return [sys.executable, "-u", "-m", "demo", *args]


def demo_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k != "DATABASE_URL" and not k.startswith(("DEMO_", "OTEL_"))
    }
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def run_demo(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 90.0
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m demo ARGS`` (e.g. ``restart-db --url ...``) to its end; its output."""
    return subprocess.run(
        demo_command(*args), cwd=ROOT, env=demo_env(env), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


@contextlib.contextmanager
def demo_process(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 90.0
) -> Iterator[DemoProcess]:
    """Start ``python -m demo --port 0 ARGS`` and wait for its banner; stop it (Ctrl-C) after."""
    proc = subprocess.Popen(
        demo_command("--port", "0", *args),
        cwd=ROOT,
        env=demo_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    demo = DemoProcess(proc)

    def collect() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            demo.lines.append(line)

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    try:
        ready = wait_until(
            lambda: "Ctrl-C stops everything" in demo.output or proc.poll() is not None, timeout
        )
        assert ready and proc.poll() is None, f"demo did not start:\n{demo.output}"
        demo.base_url = demo.banner_value("page").rstrip("/")
        yield demo
    finally:
        # Gracefully first, even when the test failed: a SIGKILLed demo cannot stop the
        # PostgreSQL it started (a process of its own session), which would outlive the test.
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=5)


class OtlpReceiver:
    """A tiny OTLP/HTTP trace endpoint on 127.0.0.1 that keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path == "/v1/traces":
                    receiver.requests.append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def spans(self) -> list[tuple[str, str, dict[str, object]]]:
        """(service name, span name, attributes) of every span received."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        found = []
        for body in self.requests:
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        attributes = {a.key: _value(a.value) for a in span.attributes}
                        attributes["_span_id"] = span.span_id.hex()
                        attributes["_parent_id"] = span.parent_span_id.hex()
                        found.append((str(resource.get("service.name")), span.name, attributes))
        return found


def _value(value: object) -> object:
    kind = value.WhichOneof("value")  # type: ignore[attr-defined]
    return getattr(value, kind) if kind else None
