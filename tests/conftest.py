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
# on a loaded 2-core machine the ephemeral API server can take longer than
# Prefect's default 20 s to come up
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# the ephemeral API starts slowly on a busy 2-core machine (default: 20 s)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ["ENGINEFARM_TINY_DIR"] = str(_SESSION_TMP / "tiny")
os.environ["ENGINEFARM_CACHE"] = str(_SESSION_TMP / "cache")
os.environ.pop("ENGINEFARM_STORE", None)


# ============================================================================
# store fixtures (enginefarm.store): a real S3-compatible HTTP server (moto in
# server mode on a free loopback port) and a `store` fixture run over both
# implementations. Owned by the store; other fixtures go outside this block.
# ============================================================================

# Dummy credentials for the test S3 server only, never real ones: set for the
# whole session (before anything makes a boto3 client), with the user's AWS
# config files and profile out of reach.
for _k in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL_S3",
           "AWS_REQUEST_CHECKSUM_CALCULATION", "AWS_RESPONSE_CHECKSUM_VALIDATION"):
    os.environ.pop(_k, None)
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
os.environ["AWS_CONFIG_FILE"] = str(_SESSION_TMP / "aws-config")
os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(_SESSION_TMP / "aws-credentials")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """The URL of a moto S3 server for this session; boto3 finds it through
    AWS_ENDPOINT_URL, as it would find a real endpoint."""
    import logging

    from moto.server import ThreadedMotoServer

    # the server's access log is noise, and from its threads it would land in
    # whatever stderr a test is capturing
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    os.environ["AWS_ENDPOINT_URL"] = url
    try:
        yield url
    finally:
        server.stop()
        os.environ.pop("AWS_ENDPOINT_URL", None)


@pytest.fixture
def s3_store_uri(s3_server):
    """s3://<a fresh bucket>/engines (the store never creates buckets itself)."""
    import boto3

    bucket = f"farm-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return f"s3://{bucket}/engines"


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """An opened, empty Store: a directory under tmp_path, or a fresh S3 bucket."""
    from enginefarm.store import open_store

    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    return open_store(request.getfixturevalue("s3_store_uri"))


# ============================================================================
# end of store fixtures
# ============================================================================
