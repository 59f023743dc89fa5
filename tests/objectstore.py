"""A real S3-compatible object store for the tests: moto's server on 127.0.0.1, reached over HTTP through
pyarrow's S3 filesystem (endpoint_override in the URI), with a proxy in front that can take the endpoint
down in the middle of an upload.

The trainer, its Ray workers and the test all talk HTTP to the same server; nothing is mocked in-process.
Credentials are moto's test ones, in the environment of the processes that talk to it (`env`).
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass, field
from typing import Optional

import boto3
from moto.server import ThreadedMotoServer

from tests.helpers import free_port

BUCKET = "runs"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class Outage:
    """Go down at the `puts`-th PUT into the `checkpoint`-th checkpoint directory (1-based) under `run`."""

    run: str
    checkpoint: int
    puts: int
    seen: list[str] = field(default_factory=list)  # checkpoint directories, in the order their uploads began
    count: int = 0

    def hit(self, data: bytes) -> bool:
        for name in re.findall(rb"PUT /" + re.escape(f"{BUCKET}/{self.run}/train/".encode()) +
                               rb"(checkpoint_[^/ ?]+)/", data):
            name = name.decode()
            if name not in self.seen:
                self.seen.append(name)
            if len(self.seen) >= self.checkpoint and name == self.seen[self.checkpoint - 1]:
                self.count += 1
                if self.count >= self.puts:
                    return True
        return False


class FlakyEndpoint:
    """A TCP proxy to `upstream`. While down, open connections are cut and new ones closed at once: to the
    client the endpoint is gone (the SDK retries, then pyarrow raises OSError)."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.down = threading.Event()
        self.outage: Optional[Outage] = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            if self.down.is_set():
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            with self._lock:
                self._open |= {client, upstream}
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while data := src.recv(65536):
                if requests and self.outage is not None and self.outage.hit(data):
                    self.go_down()
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def go_down(self) -> None:
        self.down.set()
        with self._lock:
            for s in self._open:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._open.clear()

    def come_back(self) -> None:
        self.outage = None
        self.down.clear()

    def close(self) -> None:
        self.go_down()
        self.server.close()


class ObjectStore:
    """moto's S3 server with one bucket, and the flaky endpoint in front of it."""

    def __init__(self) -> None:
        port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        self.server.start()
        self.direct = f"127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=f"http://{self.direct}", **_boto_credentials()).create_bucket(Bucket=BUCKET)
        self.endpoint = FlakyEndpoint(port)

    @property
    def env(self) -> dict[str, str]:
        return dict(CREDENTIALS)

    def uri(self, key: str, direct: bool = False) -> str:
        """s3://runs/KEY through the flaky endpoint (or straight to the server)."""
        where = self.direct if direct else f"127.0.0.1:{self.endpoint.port}"
        return f"s3://{BUCKET}/{key}?endpoint_override={where}&scheme=http&region=us-east-1"

    def keys(self, prefix: str) -> list[str]:
        client = boto3.client("s3", endpoint_url=f"http://{self.direct}", **_boto_credentials())
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def read(self, key: str) -> bytes:
        client = boto3.client("s3", endpoint_url=f"http://{self.direct}", **_boto_credentials())
        return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    def close(self) -> None:
        self.endpoint.close()
        self.server.stop()


def _boto_credentials() -> dict[str, str]:
    return {"aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            "region_name": CREDENTIALS["AWS_DEFAULT_REGION"]}
