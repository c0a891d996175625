"""A real S3-speaking server on loopback for the tests: moto's ThreadedMotoServer, as
s3fs's own tests use."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import boto3
from moto.server import ThreadedMotoServer

CREDENTIALS = {"key": "testing", "secret": "testing"}


@contextlib.contextmanager
def moto_endpoint(*buckets: str) -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a fresh moto server holding these buckets."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                              aws_secret_access_key="testing", region_name="us-east-1")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        server.stop()
