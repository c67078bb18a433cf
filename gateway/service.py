"""The Recommender gRPC servicer: protobuf -> domain -> Recommender -> protobuf."""

from __future__ import annotations

import time

import grpc

from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc
from fusionrec.gateway import convert
from fusionrec.gateway.pipeline import Recommender


class RecommenderServicer(pb_grpc.RecommenderServicer):
    def __init__(self, recommender: Recommender, default_deadline_ms: int) -> None:
        self.recommender = recommender
        self.default_deadline_s = default_deadline_ms / 1000

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return time.monotonic() + (self.default_deadline_s if remaining is None else remaining)

    async def Recommend(self, request: pb.RecommendRequest, context) -> pb.RecommendResponse:
        rec = await self.recommender.recommend(convert.recommend_from_pb(request), self._deadline(context))
        return convert.recommendation_to_pb(rec)

    async def UpsertItems(self, request: pb.UpsertItemsRequest, context) -> pb.UpsertItemsResponse:
        n = await self.recommender.upsert([convert.item_from_pb(i) for i in request.items])
        return pb.UpsertItemsResponse(upserted=n, encoder_versions=self.recommender.encoder_versions)

    async def DeleteItems(self, request: pb.DeleteItemsRequest, context) -> pb.DeleteItemsResponse:
        deleted, not_found = await self.recommender.delete(list(request.item_ids))
        return pb.DeleteItemsResponse(deleted=deleted, not_found=not_found)

    async def GetItem(self, request: pb.GetItemRequest, context) -> pb.Item:
        return convert.item_view_to_pb(await self.recommender.get(request.item_id))

    async def RecordInteractions(self, request: pb.RecordInteractionsRequest, context) -> pb.RecordInteractionsResponse:
        n = await self.recommender.record([convert.interaction_from_pb(e) for e in request.interactions])
        return pb.RecordInteractionsResponse(recorded=n)
