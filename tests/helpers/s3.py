"""A real S3 API on 127.0.0.1: moto's server (``moto[server]``) on a free port, in a process of
its own, with one bucket.

Not in a thread of the test process: moto's server imports Flask, and a Flask ``LocalProxy``
left in ``sys.modules`` breaks vLLM's CPU kernel registration (it probes every module's
globals with ``hasattr``, which such a proxy answers with a RuntimeError outside an app), so
every later in-process vLLM engine of the session would fail to start."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

BUCKET = "rlalign-test"
# moto accepts any credentials; botocore needs some to sign requests
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def s3_server() -> Iterator[str]:
    """Yields the endpoint URL (``http://127.0.0.1:PORT``) of a server holding ``BUCKET``."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_listening(port, server)
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        ).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _wait_listening(port: int, server: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Until the server accepts connections on ``port`` (it exits: fail at once)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"moto's server exited with {server.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"moto's server did not listen on 127.0.0.1:{port} in {timeout_s:.0f} s")


def have_moto_server() -> bool:
    """Whether ``moto[server]`` is installed (found without importing it: see above)."""
    return all(importlib.util.find_spec(m) is not None for m in ("moto", "flask"))


def options(endpoint: str) -> dict:
    """``trainer.storage_options`` for the server, credentials included (for processes that
    do not have them in their environment)."""
    return {
        "endpoint_url": endpoint,
        "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    }
