"""The Recommender gRPC servicer: protobuf -> domain -> Recommender -> protobuf."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, TypeVar

import grpc

from fusionrec.core.errors import DeadlineExceeded
from fusionrec.gateway import convert
from fusionrec.gateway.pipeline import Recommender
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc

T = TypeVar("T")


class RecommenderServicer(pb_grpc.RecommenderServicer):
    """protobuf <-> domain around Recommender; every RPC runs under a deadline: the caller's, capped
    by ``max_call_ms`` (a stuck or restarting replica answers DEADLINE_EXCEEDED, never hangs)."""

    def __init__(self, recommender: Recommender, default_deadline_ms: int, max_call_ms: int = 120_000) -> None:
        self.recommender = recommender
        self.default_deadline_s = default_deadline_ms / 1000
        self.max_call_s = max_call_ms / 1000

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return time.monotonic() + (self.default_deadline_s if remaining is None else remaining)

    async def _bounded(self, call: Awaitable[T], context: grpc.aio.ServicerContext, what: str) -> T:
        """``call`` within the caller's deadline (none: ``max_call_ms``); cancelled when it runs out."""
        remaining = context.time_remaining()
        timeout_s = self.max_call_s if remaining is None else min(remaining, self.max_call_s)
        try:
            return await asyncio.wait_for(call, timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"{what} did not finish within {timeout_s * 1000:.0f} ms; it may still take "
                                   "effect: retrying is safe for upserts and deletes (by id)") from None

    async def Recommend(self, request: pb.RecommendRequest, context) -> pb.RecommendResponse:
        rec = await self._bounded(self.recommender.recommend(convert.recommend_from_pb(request), self._deadline(context)),
                                  context, "Recommend")
        return convert.recommendation_to_pb(rec)

    async def UpsertItems(self, request: pb.UpsertItemsRequest, context) -> pb.UpsertItemsResponse:
        n = await self._bounded(self.recommender.upsert([convert.item_from_pb(i) for i in request.items]),
                                context, "UpsertItems")
        return pb.UpsertItemsResponse(upserted=n, encoder_versions=self.recommender.encoder_versions)

    async def DeleteItems(self, request: pb.DeleteItemsRequest, context) -> pb.DeleteItemsResponse:
        deleted, not_found = await self._bounded(self.recommender.delete(list(request.item_ids)), context, "DeleteItems")
        return pb.DeleteItemsResponse(deleted=deleted, not_found=not_found)

    async def GetItem(self, request: pb.GetItemRequest, context) -> pb.Item:
        return convert.item_view_to_pb(await self._bounded(self.recommender.get(request.item_id), context, "GetItem"))

    async def RecordInteractions(self, request: pb.RecordInteractionsRequest, context) -> pb.RecordInteractionsResponse:
        n = await self._bounded(self.recommender.record([convert.interaction_from_pb(e) for e in request.interactions]),
                                context, "RecordInteractions")
        return pb.RecordInteractionsResponse(recorded=n, duplicates=len(request.interactions) - n)
