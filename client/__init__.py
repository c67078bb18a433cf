"""The Python client of the fusionrec gRPC API.

    from fusionrec.client import Client, item
    with Client("127.0.0.1:9000", token="...", deadline_s=2) as client:
        client.upsert_items([item("sku-1", text="a calm photo of a cat", image="cat.jpg", attributes={"year": 2019})])
        reply = client.recommend("user-001", k=5, text="a cat", filters={"year": (2000, 2015)})

``AsyncClient`` is the asyncio twin. Options (deadlines, TLS, token, retries, keepalive, load balancing)
are ``ClientOptions`` fields. Failed calls raise ``ServiceError`` subclasses carrying the gRPC code.
``proto_path()`` is the shipped ``.proto`` for generating clients in other languages.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fusionrec.client.aio import AsyncClient
from fusionrec.client.errors import (DeadlineExceededError, FailedPreconditionError, InvalidArgumentError,
                                     NotFoundError, PermissionDeniedError, ResourceExhaustedError, ServiceError,
                                     UnauthenticatedError, UnavailableError)
from fusionrec.client.messages import (Range, attributes_from_pb, filter_to_pb, filters_to_pb, interaction, item,
                                       recommend_request, value_from_pb, value_to_pb)
from fusionrec.client.options import ClientOptions, service_config
from fusionrec.client.sync import Client

PROTO_FILE = "fusionrec/v1/recommender.proto"


def proto_path() -> Path:
    """The installed ``fusionrec/v1/recommender.proto`` (shipped in the wheel). Its include root — the
    folder to pass to ``protoc -I`` — is ``proto_path().parents[2]``."""
    path = Path(str(resources.files("fusionrec.v1").joinpath("recommender.proto")))
    if not path.is_file():
        raise FileNotFoundError(f"the fusionrec package lacks {PROTO_FILE} (looked at {path})")
    return path


__all__ = ["AsyncClient", "Client", "ClientOptions", "DeadlineExceededError", "FailedPreconditionError",
           "InvalidArgumentError", "NotFoundError", "PermissionDeniedError", "PROTO_FILE", "Range",
           "ResourceExhaustedError", "ServiceError", "UnauthenticatedError", "UnavailableError",
           "attributes_from_pb", "filter_to_pb", "filters_to_pb", "interaction", "item", "proto_path", "recommend_request",
           "service_config", "value_from_pb", "value_to_pb"]
