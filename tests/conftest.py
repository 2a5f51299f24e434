"""Shared fixtures: an isolated environment for every test session (Prefect
home, tiny-checkpoint dir, inductor cache), and a real S3-compatible HTTP
server (moto's server mode on a free loopback port)."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="enginefarm-tests-"))
# before anything imports prefect: a private, throwaway Prefect home
os.environ["PREFECT_HOME"] = str(_SESSION_TMP / "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["ENGINEFARM_TINY_DIR"] = str(_SESSION_TMP / "tiny")
os.environ["ENGINEFARM_CACHE"] = str(_SESSION_TMP / "cache")
os.environ.pop("ENGINEFARM_STORE", None)
# dummy credentials for the test S3 server only; never real ones
for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
    os.environ.pop(k, None)
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ["AWS_CONFIG_FILE"] = str(_SESSION_TMP / "aws-config")
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(_SESSION_TMP / "aws-credentials")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = url
    yield url
    server.stop()
    os.environ.pop("AWS_ENDPOINT_URL", None)


@pytest.fixture
def s3_store_uri(s3_server):
    import boto3

    bucket = f"farm-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/engines"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    from enginefarm.store import open_store

    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_store_uri"))
