"""The blocking client: one channel, typed methods for every RPC of fusionrec.v1.Recommender and health."""

from __future__ import annotations

import time
from typing import Iterable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fusionrec.client.channel import open_channel
from fusionrec.client.errors import ServiceError, from_rpc_error
from fusionrec.client.messages import Filters, Media, recommend_request
from fusionrec.client.options import ClientOptions, auth_metadata, make_options
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc

#: GetItem calls in flight at once when checking which ids are stored.
LOOKUP_CONCURRENCY = 16


class Client:
    """A fusionrec client. Typed methods raise ``fusionrec.client.errors.ServiceError`` subclasses.

    ``Client("host:9000", token="...", deadline_s=2, tls=True)``: any ClientOptions field is a keyword, or
    pass ``options=ClientOptions(...)``. ``stub`` and ``health`` are the raw stubs on the same channel
    (they raise ``grpc.RpcError``); the channel fills in the default deadline and, over plaintext, the
    token, so ``metadata`` (the auth metadata a plaintext call needs) is only for other channels.
    """

    def __init__(self, target: str | None = None, token: str | None = None, *,
                 options: ClientOptions | None = None, **settings: object) -> None:
        self.options = make_options(options, target=target, token=token, **settings)
        self.channel = open_channel(self.options)
        self.stub = pb_grpc.RecommenderStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = auth_metadata(self.options)

    def _call(self, method: str, request, timeout_s: float | None):
        try:
            return getattr(self.stub, method)(request, timeout=timeout_s)
        except grpc.RpcError as err:
            raise from_rpc_error(err, method) from None

    def recommend(self, user_id: str = "", *, k: int = 10, text: str = "", image: Media = None,
                  audio: Media = None, history: Sequence[str] = (), filters: Filters = None,
                  exclude: Sequence[str] = (), include_seen: bool = False, timings: bool = False,
                  timeout_s: float | None = None) -> pb.RecommendResponse:
        """Top-k items for ``user_id`` and/or query content (``image``/``audio``: bytes or a file path),
        with ``filters`` such as ``{"mood": "calm", "year": (2000, 2015), "category": {"cat", "horse"}}``."""
        request = recommend_request(user_id, k=k, text=text, image=image, audio=audio, history=history,
                                    filters=filters, exclude=exclude, include_seen=include_seen, timings=timings)
        return self._call("Recommend", request, timeout_s)

    def upsert_items(self, items: Iterable[pb.ItemInput], timeout_s: float | None = None) -> pb.UpsertItemsResponse:
        """Encode and store items (build them with ``fusionrec.client.item``); all or nothing per call."""
        return self._call("UpsertItems", pb.UpsertItemsRequest(items=list(items)), timeout_s)

    def delete_items(self, item_ids: Iterable[str], timeout_s: float | None = None) -> pb.DeleteItemsResponse:
        return self._call("DeleteItems", pb.DeleteItemsRequest(item_ids=list(item_ids)), timeout_s)

    def get_item(self, item_id: str, timeout_s: float | None = None) -> pb.Item:
        """The stored item; NotFoundError when there is none."""
        return self._call("GetItem", pb.GetItemRequest(item_id=item_id), timeout_s)

    def stored_ids(self, item_ids: Iterable[str], timeout_s: float | None = None) -> set[str]:
        """Which of ``item_ids`` are stored (GetItem calls, a few at a time)."""
        ids, out = list(item_ids), set()
        for start in range(0, len(ids), LOOKUP_CONCURRENCY):
            chunk = ids[start:start + LOOKUP_CONCURRENCY]
            futures = [self.stub.GetItem.future(pb.GetItemRequest(item_id=i), timeout=timeout_s) for i in chunk]
            for item_id, future in zip(chunk, futures):
                try:
                    future.result()
                    out.add(item_id)
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.NOT_FOUND:
                        raise from_rpc_error(err, "GetItem") from None
        return out

    def record_interactions(self, events: Iterable[pb.Interaction],
                            timeout_s: float | None = None) -> pb.RecordInteractionsResponse:
        """Append user events (build them with ``fusionrec.client.interaction``). Not retried on UNAVAILABLE:
        the server may have recorded them."""
        return self._call("RecordInteractions", pb.RecordInteractionsRequest(interactions=list(events)), timeout_s)

    def health_status(self, service: str = "", timeout_s: float | None = None) -> str:
        """The health status name (SERVING, NOT_SERVING, ...) of the server ('') or one service."""
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as err:
            raise from_rpc_error(err, "Health.Check") from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def serving(self, timeout_s: float = 5.0) -> bool:
        """True when the server's health is SERVING; False when it is not or cannot be reached."""
        try:
            return self.health_status(timeout_s=timeout_s) == "SERVING"
        except ServiceError:
            return False

    def wait_until_serving(self, timeout_s: float = 60.0, poll_s: float = 0.5) -> bool:
        """Poll health until SERVING (True) or ``timeout_s`` passes (False)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.serving(timeout_s=max(0.1, min(5.0, deadline - time.monotonic()))):
                return True
            if time.monotonic() + poll_s > deadline:
                return False
            time.sleep(poll_s)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
