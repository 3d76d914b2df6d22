"""An S3 server for tests: moto's server mode as a subprocess on a free loopback port.

No MinIO server is in the registries; moto's server speaks the S3 REST API (ranged GETs,
multipart uploads) over real HTTP, so s3fs/botocore talk to it exactly as to S3. Tests
get the endpoint and a fresh bucket each; the standard AWS environment points there.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import free_port, stop


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def env(self) -> dict[str, str]:
        """The standard AWS environment of a client of this server."""
        return {
            "AWS_ACCESS_KEY_ID": "slidepipe-test",
            "AWS_SECRET_ACCESS_KEY": "slidepipe-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def new_bucket(self) -> str:
        import boto3

        name = f"slidepipe-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint, **_credentials(self)).create_bucket(
            Bucket=name
        )
        return name


def _credentials(server: S3Server) -> dict[str, str]:
    env = server.env()
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A private moto S3 server process for the session (stopped by its own id)."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1",
             "-p", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(endpoint, timeout=2).status_code < 500:
                break
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(f"moto_server did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.1)
    try:
        yield S3Server(endpoint)
    finally:
        stop(proc)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """This process's AWS environment pointed at the test server."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    return s3_server


__all__ = ["S3Server", "s3_server", "s3_env", "os"]
