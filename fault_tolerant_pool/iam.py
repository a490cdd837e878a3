"""AWS RDS and Aurora IAM authentication: a token per login, cached until shortly before expiry.

Needs ``boto3`` (``pip install "fault_tolerant_pool[iam]"``). A token is a SigV4-presigned URL,
made locally by ``generate_db_auth_token`` from the AWS credentials boto3 finds; it is valid
for 15 minutes for new logins (a connection made with it stays open). The pool caches it and
asks for a new one a minute before it expires, or at once when a login with it is refused.
RDS refuses IAM logins without TLS: connect with ``sslmode=require`` (psycopg) or ``ssl=True``
(asyncpg).
"""

from __future__ import annotations

from typing import Any

#: How long RDS accepts a token for new logins, in seconds.
TOKEN_LIFETIME = 900.0


class RdsIamCredentials:
    """Provider of RDS IAM tokens for ``user`` at ``host:port``; pass it as ``credentials=``.

    ``region`` defaults to the boto3 session's. Give ``session`` (a ``boto3.session.Session``)
    to choose the AWS credentials, or ``client`` (an RDS client) to reuse one. boto3 may reach
    the network to refresh its own AWS credentials, so async engines call this provider in a
    worker thread (``blocking``).
    """

    blocking = True

    def __init__(
        self,
        host: str,
        user: str,
        *,
        port: int = 5432,
        region: str | None = None,
        session: Any = None,
        client: Any = None,
    ) -> None:
        self.host = host
        self.user = user
        self.port = int(port)
        if client is None:
            if session is None:
                try:
                    import boto3
                except ImportError:
                    raise ImportError(
                        "RdsIamCredentials needs boto3: pip install 'fault_tolerant_pool[iam]'"
                    ) from None
                session = boto3.session.Session()
            client = session.client("rds", region_name=region)
        self.client = client
        self.region = region or client.meta.region_name

    @property
    def name(self) -> str:
        return f"RdsIamCredentials({self.user}@{self.host}:{self.port})"

    def __repr__(self) -> str:
        return self.name

    def get_credentials(self) -> dict[str, Any]:
        token = self.client.generate_db_auth_token(
            DBHostname=self.host, Port=self.port, DBUsername=self.user, Region=self.region
        )
        return {"user": self.user, "password": token, "expires_in": TOKEN_LIFETIME}
