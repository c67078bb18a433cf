"""The asyncio client: the same typed methods as Client, awaited, over one grpc.aio channel.

Create it inside a running event loop (grpc.aio binds the channel to it) and close it with
``await client.close()`` or ``async with AsyncClient(...) as client``."""

from __future__ import annotations

import asyncio
from typing import Iterable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fusionrec.client.channel import open_aio_channel
from fusionrec.client.errors import ServiceError, from_rpc_error
from fusionrec.client.messages import Filters, Media, recommend_request
from fusionrec.client.options import ClientOptions, auth_metadata, make_options
from fusionrec.client.sync import LOOKUP_CONCURRENCY
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc


class AsyncClient:
    """asyncio twin of ``fusionrec.client.Client`` (same options, same methods, same errors)."""

    def __init__(self, target: str | None = None, token: str | None = None, *,
                 options: ClientOptions | None = None, **settings: object) -> None:
        self.options = make_options(options, target=target, token=token, **settings)
        self.channel = open_aio_channel(self.options)
        self.stub = pb_grpc.RecommenderStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = auth_metadata(self.options)

    async def _call(self, method: str, request, timeout_s: float | None):
        try:
            return await getattr(self.stub, method)(request, timeout=timeout_s)
        except grpc.RpcError as err:
            raise from_rpc_error(err, method) from None

    async def recommend(self, user_id: str = "", *, k: int = 10, text: str = "", image: Media = None,
                        audio: Media = None, history: Sequence[str] = (), filters: Filters = None,
                        exclude: Sequence[str] = (), include_seen: bool = False, timings: bool = False,
                        timeout_s: float | None = None) -> pb.RecommendResponse:
        """See Client.recommend. A file path given as ``image``/``audio`` is read in this thread."""
        request = recommend_request(user_id, k=k, text=text, image=image, audio=audio, history=history,
                                    filters=filters, exclude=exclude, include_seen=include_seen, timings=timings)
        return await self._call("Recommend", request, timeout_s)

    async def upsert_items(self, items: Iterable[pb.ItemInput],
                           timeout_s: float | None = None) -> pb.UpsertItemsResponse:
        return await self._call("UpsertItems", pb.UpsertItemsRequest(items=list(items)), timeout_s)

    async def delete_items(self, item_ids: Iterable[str], timeout_s: float | None = None) -> pb.DeleteItemsResponse:
        return await self._call("DeleteItems", pb.DeleteItemsRequest(item_ids=list(item_ids)), timeout_s)

    async def get_item(self, item_id: str, timeout_s: float | None = None) -> pb.Item:
        return await self._call("GetItem", pb.GetItemRequest(item_id=item_id), timeout_s)

    async def stored_ids(self, item_ids: Iterable[str], timeout_s: float | None = None) -> set[str]:
        """Which of ``item_ids`` are stored (GetItem calls, a few at a time)."""
        ids, out = list(item_ids), set()
        for start in range(0, len(ids), LOOKUP_CONCURRENCY):
            chunk = ids[start:start + LOOKUP_CONCURRENCY]
            replies = await asyncio.gather(*(self.get_item(i, timeout_s) for i in chunk), return_exceptions=True)
            for item_id, reply in zip(chunk, replies):
                if isinstance(reply, BaseException):
                    if not (isinstance(reply, ServiceError) and reply.code == grpc.StatusCode.NOT_FOUND):
                        raise reply
                else:
                    out.add(item_id)
        return out

    async def record_interactions(self, events: Iterable[pb.Interaction],
                                  timeout_s: float | None = None) -> pb.RecordInteractionsResponse:
        return await self._call("RecordInteractions", pb.RecordInteractionsRequest(interactions=list(events)),
                                timeout_s)

    async def health_status(self, service: str = "", timeout_s: float | None = None) -> str:
        try:
            reply = await self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as err:
            raise from_rpc_error(err, "Health.Check") from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def serving(self, timeout_s: float = 5.0) -> bool:
        try:
            return await self.health_status(timeout_s=timeout_s) == "SERVING"
        except ServiceError:
            return False

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
