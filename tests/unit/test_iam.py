"""RDS IAM tokens, offline: boto3 signs locally with fake AWS credentials; time is injected."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from fault_tolerant_pool.credentials import CredentialSource
from fault_tolerant_pool.iam import TOKEN_LIFETIME, RdsIamCredentials
from fault_tolerant_pool.stats import ConnectCounters

boto3 = pytest.importorskip("boto3")

FAKE_KEY_ID = "AKIAIOSFODNN7EXAMPLE"
FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


def provider() -> RdsIamCredentials:
    session = boto3.session.Session(
        aws_access_key_id=FAKE_KEY_ID, aws_secret_access_key=FAKE_SECRET, region_name="eu-west-1"
    )
    return RdsIamCredentials("db.example.internal", "app", port=5433, session=session)


def test_generates_a_presigned_rds_connect_token() -> None:
    answer = provider().get_credentials()
    assert answer["user"] == "app" and answer["expires_in"] == TOKEN_LIFETIME == 900
    token = answer["password"]
    url = urlsplit("https://" + token)
    assert (url.hostname, url.port) == ("db.example.internal", 5433)
    query = parse_qs(url.query)
    assert query["Action"] == ["connect"] and query["DBUser"] == ["app"]
    assert query["X-Amz-Expires"] == ["900"]
    assert query["X-Amz-Credential"][0].startswith(f"{FAKE_KEY_ID}/")
    assert "/eu-west-1/rds-db/aws4_request" in query["X-Amz-Credential"][0]
    assert len(query["X-Amz-Signature"][0]) == 64
    assert FAKE_SECRET not in token


def test_tokens_are_cached_and_refreshed_before_they_expire() -> None:
    class Clock:
        now = 2_000_000.0

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    iam = provider()
    calls = []
    original = iam.client.generate_db_auth_token

    def counting(**kw: object) -> str:
        calls.append(kw)
        return str(original(**kw))

    iam.client.generate_db_auth_token = counting
    counters = ConnectCounters()
    source = CredentialSource(iam, counters, clock=clock)
    first = source.get(in_loop=False, timeout=5)
    assert first.user == "app" and "Action=connect" in first.password
    clock.now += 14 * 60 - 1  # within the 15 minutes, more than a minute before expiry
    assert source.get(in_loop=False, timeout=5) is first
    assert len(calls) == 1
    clock.now += 2  # a minute before expiry: a new token
    second = source.get(in_loop=False, timeout=5)
    assert second is not first and len(calls) == 2
    assert calls[0] == {
        "DBHostname": "db.example.internal", "Port": 5433, "DBUsername": "app",
        "Region": "eu-west-1",
    }  # fmt: skip
    assert source.name == "RdsIamCredentials(app@db.example.internal:5433)"
    assert iam.blocking is True  # async engines call it in a worker thread
