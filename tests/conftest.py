"""Shared fixtures: a real S3-protocol server (moto's server mode) on 127.0.0.1.

``s3_endpoint`` (session) -> endpoint URL; ``s3_bucket`` -> a fresh bucket name per test;
``storage_options`` -> the fsspec kwargs that point s3fs at the endpoint.
Test helper modules in this folder (``data_helpers``) are importable by tests: pytest runs with
``--import-mode=importlib``, which does not put ``tests/`` on ``sys.path``.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.request
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Without a GPU, rgfusion's Triton kernels run on CPU tensors through Triton's interpreter. It is
# chosen when a kernel is defined, so it is set before any test imports one.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

_DUMMY_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server for the whole session, with dummy credentials in the environment."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in _DUMMY_AWS}
    os.environ.update(_DUMMY_AWS)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/moto-api/", timeout=2)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"moto S3 server on {url} did not answer in 30 s: {e}") from None
            time.sleep(0.1)
    yield url
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def make_storage_options(endpoint: str) -> dict:
    # Fresh s3fs instances per options dict keep tests from sharing cached listings.
    return {"client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True}


@pytest.fixture
def storage_options(s3_endpoint) -> dict:
    """fsspec/s3fs kwargs for the test S3 endpoint."""
    return make_storage_options(s3_endpoint)


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A new, empty bucket on the test endpoint; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name
