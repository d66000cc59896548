"""A real S3 API for the tests: moto's server mode on a loopback port, started once per session.

Not a mock object: s3fs (and so every fsspec ``s3://`` path diffsplit opens) talks HTTP to it exactly as to
a bucket, with conditional writes (``If-None-Match``), ranged GETs and paginated listings. Subprocesses the
tests start inherit the endpoint and credentials through the environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...), the same variables a user sets for a real bucket or an S3-compatible store.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def s3_server() -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 (a free port), point the AWS environment at it, yield its URL;
    stop it and restore the environment after."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {key: os.environ.get(key) for key in (*ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        import fsspec

        fsspec.filesystem("s3").clear_instance_cache()  # a later server gets a fresh client


def new_bucket(prefix: str = "test") -> str:
    """Create a bucket with a fresh name on the current server; returns ``s3://<name>``."""
    import fsspec

    name = f"{prefix}-{uuid.uuid4().hex[:12]}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(name)
    fs.invalidate_cache()
    return f"s3://{name}"
