"""Bad input at the boundary: a malformed URL, a bad driver option, a host name that does not
resolve, a port with nothing behind it. Each ends in a clear error within the deadline, and no
password appears in it."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from fault_tolerant_pool import ConnectRetriesExhausted, FaultTolerantQueuePool
from fault_tolerant_pool.testing.server import free_port
from tests.db.client import FLAVOURS, Client

from .harness import Outcome, request

pytestmark = [pytest.mark.anyio]

flavours = pytest.mark.parametrize("flavour", FLAVOURS)
SECRET = "pw-secret-42"
DEADLINE = 1.0


def url(flavour: str, rest: str) -> str:
    return f"postgresql+{flavour}://app:{SECRET}@{rest}"


async def failed_connect(flavour: str, rest: str) -> tuple[Outcome, ConnectRetriesExhausted]:
    client = Client(url(flavour, rest), flavour, poolclass=FaultTolerantQueuePool,
                    retry_deadline=DEADLINE)  # fmt: skip
    outcome = await request(client)
    await client.dispose()
    assert outcome.stage == "checkout", outcome
    assert isinstance(outcome.error, sa.exc.OperationalError), outcome.error
    assert isinstance(outcome.error.orig, ConnectRetriesExhausted)
    assert SECRET not in str(outcome.error)
    assert client.stats().checked_out == 0
    return outcome, outcome.error.orig


@flavours
@pytest.mark.parametrize(
    ("malformed", "error", "says"),
    [
        ("postgresql+{flavour}://app:{secret}@127.0.0.1:notaport/db", ValueError, "notaport"),
        ("postgresql+{flavour}//app:{secret}@127.0.0.1/db", sa.exc.ArgumentError, "parse"),
    ],
    ids=["port not a number", "not a URL"],
)
def test_malformed_url_is_refused_when_the_engine_is_made(
    flavour: str, malformed: str, error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=says) as info:
        Client(malformed.format(flavour=flavour, secret=SECRET), flavour,
               poolclass=FaultTolerantQueuePool)  # fmt: skip
    assert SECRET not in str(info.value)


#: A connect option each driver refuses, and the words it uses.
BAD_OPTION = {
    "asyncpg": ("ssl=bogus", "sslmode"),  # ClientConfigurationError
    "psycopg_async": ("sslmode=bogus", 'invalid sslmode value: "bogus"'),
    "psycopg": ("sslmode=bogus", 'invalid sslmode value: "bogus"'),
}


@flavours
async def test_bad_driver_option_fails_on_the_first_attempt(flavour: str) -> None:
    """A bad argument is not retried. SQLAlchemy 2.1 adapts asyncpg's configuration error to a
    DBAPI error (the pool then raises its ``OperationalError``); 2.0 lets it through as it is,
    and so does the pool, like any bad argument (a ``TypeError`` from ``connect_args``)."""
    option, says = BAD_OPTION[flavour]
    client = Client(url(flavour, f"127.0.0.1:{free_port()}/db?{option}"), flavour,
                    poolclass=FaultTolerantQueuePool, retry_deadline=DEADLINE)  # fmt: skip
    outcome = await request(client)
    await client.dispose()
    assert outcome.stage == "checkout" and outcome.duration < DEADLINE, outcome
    assert says in str(outcome.error) and SECRET not in str(outcome.error)
    stats = client.stats()
    assert stats.attempts == 1 and stats.give_ups == 1 and stats.checked_out == 0
    if isinstance(outcome.error, sa.exc.OperationalError):
        assert isinstance(outcome.error.orig, ConnectRetriesExhausted)
        assert outcome.error.orig.attempts == 1 and not outcome.error.orig.transient
    else:
        assert flavour == "asyncpg" and sa.__version__.startswith("2.0"), outcome.error
        assert type(outcome.error).__name__ == "ClientConfigurationError"


@flavours
async def test_host_name_that_does_not_resolve_fails_on_the_first_attempt(flavour: str) -> None:
    """``.invalid`` never resolves (RFC 2606): the name is wrong, retrying will not fix it."""
    outcome, error = await failed_connect(flavour, "no-such-host.invalid:5432/db")
    assert error.attempts == 1 and not error.transient
    assert "no-such-host.invalid" in str(outcome.error) or "Name or service not known" in str(
        outcome.error
    )
    assert outcome.duration < DEADLINE + 0.5


@flavours
async def test_port_with_nothing_behind_it_is_retried_until_the_deadline(flavour: str) -> None:
    """Refused is transient (a server restarting refuses too): retried until the deadline,
    then the error says how many attempts, how long, and what the last one met."""
    outcome, error = await failed_connect(flavour, f"127.0.0.1:{free_port()}/db")
    assert error.transient and error.attempts >= 4
    assert DEADLINE <= outcome.duration < DEADLINE + 0.6
    message = str(outcome.error)
    assert f"after {error.attempts} attempts" in message
    assert "Connection refused" in message or "Connect call failed" in message, message
