"""A Google Cloud Storage endpoint on 127.0.0.1 for the object-store tests.

The server is ``gcp-storage-emulator`` (GCS's JSON API, in memory) in a child process of
its own: it creates its bucket, prints its port and serves until its stdin closes. The
store's helpers reach it through gcsfs, as they would reach GCS.
"""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from object_store_support import server_in_child

_SERVER = """
import sys

from gcp_storage_emulator.server import create_server

server = create_server("127.0.0.1", 0, in_memory=True, default_bucket=sys.argv[1])
server.start()
print(server._api._httpd.server_address[1], flush=True)
sys.stdin.read()
server.stop()
"""


@dataclass(frozen=True)
class GcsEndpoint:
    """An emulated GCS server: its URL, and the storage options that reach it."""

    endpoint: str

    def options(self) -> dict[str, Any]:
        """gcsfs storage options for this endpoint (JSON, as ObjectStore wants)."""
        return {"token": "anon", "project": "test", "endpoint_url": self.endpoint}

    def object_names(self, bucket: str, prefix: str) -> list[str]:
        """The names of every object under ``prefix`` in ``bucket``, read over HTTP."""
        names: list[str] = []
        query = {"prefix": prefix}
        while True:
            url = f"{self.endpoint}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"
            with urllib.request.urlopen(url, timeout=30) as response:
                page = json.load(response)
            names.extend(item["name"] for item in page.get("items", []))
            if not page.get("nextPageToken"):
                return sorted(names)
            query["pageToken"] = page["nextPageToken"]


@contextmanager
def gcs_emulator(bucket: str) -> Iterator[GcsEndpoint]:
    """Start an emulated GCS server holding ``bucket``; stop it on exit."""
    with server_in_child(_SERVER, bucket) as port:
        yield GcsEndpoint(f"http://127.0.0.1:{port}")
