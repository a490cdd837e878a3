"""docker-compose.yml and the Dockerfile, checked offline (no Docker engine runs here).

The compose file is validated against the Compose Specification's schema (the copy vendored in
check-jsonschema) and kept consistent with what the demo reads: every variable it sets is one the
demo knows, with a value the demo accepts, pointing at the services that exist.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from demo.settings import ENVIRONMENT_VARIABLES, Settings

from .helpers import ROOT

yaml = pytest.importorskip("yaml")
try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"


def load() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return document


def demo_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services built from this repository's Dockerfile: the demo."""
    return {name: s for name, s in compose["services"].items() if "build" in s}


def check_schema(path: Path) -> subprocess.CompletedProcess[str]:
    """``check-jsonschema`` on a compose file, against the Compose Specification's schema."""
    check = Path(sys.executable).with_name("check-jsonschema")
    return subprocess.run(
        [str(check), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_compose_file_matches_the_compose_specification() -> None:
    result = check_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_catches_a_mistake(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        COMPOSE.read_text(encoding="utf-8").replace("    healthcheck:", "    healthchek:", 1)
    )
    result = check_schema(broken)
    assert result.returncode == 1 and "healthchek" in result.stdout


def test_the_demo_twice_pooled_and_through_pgbouncer() -> None:
    compose = load()
    services = compose["services"]
    demos = demo_services(compose)
    assert len(demos) == 2
    postgres = services["postgres"]["environment"]
    bouncer = services["pgbouncer"]["environment"]
    assert bouncer["POOL_MODE"] == "transaction"
    assert bouncer["DB_HOST"] == "postgres" and str(bouncer["DB_PORT"]) == "5432"
    assert (bouncer["DB_USER"], bouncer["DB_PASSWORD"], bouncer["DB_NAME"]) == (
        postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"],
    )  # fmt: skip

    routes = {}
    for name, service in demos.items():
        env = {k: str(v) for k, v in service["environment"].items()}
        settings = Settings.from_environ(env)  # every value is one the demo accepts
        url = settings.url
        routes[settings.pool] = url.host
        assert (url.username, url.password, url.database) == (
            postgres["POSTGRES_USER"], postgres["POSTGRES_PASSWORD"], postgres["POSTGRES_DB"],
        ), name  # fmt: skip
        assert url.host in services, f"{name} connects to a service that exists"
        assert url.host in service["depends_on"]
        if url.host == "pgbouncer":
            assert url.port == int(bouncer["LISTEN_PORT"])
        else:
            assert url.port == 5432
        # In a container the demo must listen beyond loopback, on the port that is published.
        assert settings.host == "0.0.0.0"
        published = [str(p).split(":")[-1] for p in service["ports"]]
        assert published == [str(settings.port)], name
    assert routes == {"queue": "postgres", "null": "pgbouncer"}


def test_compose_sets_only_variables_the_demo_reads() -> None:
    compose = load()
    for name, service in demo_services(compose).items():
        unknown = set(service["environment"]) - set(ENVIRONMENT_VARIABLES)
        assert not unknown, f"{name} sets variables the demo never reads: {unknown}"
    # and the demo's own code reads exactly the variables it documents
    source = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "demo").glob("*.py"))
    read = set(re.findall(r'"((?:DEMO|DATABASE|OTEL_[A-Z]+)_[A-Z_]*|DATABASE_URL)"', source))
    assert read == set(ENVIRONMENT_VARIABLES)


def test_traces_go_to_the_trace_backend() -> None:
    compose = load()
    services = compose["services"]
    for name, service in demo_services(compose).items():
        endpoint = Settings.from_environ(service["environment"]).otlp_endpoint
        assert endpoint is not None, name
        match = re.fullmatch(r"http://([a-z0-9-]+):4318", endpoint)
        assert match, f"{name}: OTLP/HTTP goes to port 4318 of a service: {endpoint}"
        backend = services[match.group(1)]
        assert "jaeger" in backend["image"]
        assert backend["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
        assert match.group(1) in service["depends_on"]


def test_dockerfile_builds_the_demo() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    lines = [line.strip() for line in re.sub(r"\\\n", " ", text).splitlines()]
    for line in lines:
        if line.startswith("COPY "):
            *sources, _ = shlex.split(line)[1:]
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such file"
    install = next(line for line in lines if line.startswith("RUN pip install"))
    extras = re.search(r"\.\[([a-z0-9_,]+)\]", install)
    assert extras, install
    with (ROOT / "pyproject.toml").open("rb") as f:
        declared = tomllib.load(f)["project"]["optional-dependencies"]
    assert set(extras.group(1).split(",")) <= set(declared)
    assert "demo" in extras.group(1).split(",")
    assert 'CMD ["python", "-m", "demo"]' in lines
    assert "EXPOSE 8000" in lines and "DEMO_PORT=8000" in text
    for name in demo_services(load()):
        assert load()["services"][name]["build"] == "."
