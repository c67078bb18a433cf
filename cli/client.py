"""``fusionrec.cli.client.Client`` is the Python client, ``fusionrec.client.Client`` (kept importable here
for older callers). The JSONL catalog format (files -> protobuf) is in fusionrec.cli.catalog."""

from __future__ import annotations

from fusionrec.client import AsyncClient, Client, ClientOptions, ServiceError

__all__ = ["AsyncClient", "Client", "ClientOptions", "ServiceError"]
