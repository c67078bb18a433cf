"""Client side of the gRPC API: the channel, the Recommender stub and health checks.

The JSONL catalog format (files -> protobuf) is in fusionrec.cli.catalog."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fusionrec.v1 import recommender_pb2_grpc as pb_grpc


class Client:
    """A Recommender stub plus health, with the auth token sent when given."""

    def __init__(self, target: str = "127.0.0.1:9000", token: str = "", max_message_mb: int = 64) -> None:
        size = max_message_mb * 1024 * 1024
        self.channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", size),
                                                              ("grpc.max_receive_message_length", size)])
        self.stub = pb_grpc.RecommenderStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def serving(self, timeout_s: float = 5.0) -> bool:
        """True when the server's health is SERVING."""
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def close(self) -> None:
        self.channel.close()

