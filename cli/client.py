"""Client side of the gRPC API: channels, JSONL catalogs -> protobuf, health checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc
from fusionrec.gateway.convert import value_to_pb


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


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path) as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None


def item_to_pb(row: dict, base_dir: Path) -> pb.ItemInput:
    """A catalog row -> ItemInput. Rows: id, attributes, text, image/audio (paths relative to
    the catalog), vectors ({modality: [floats]} or {modality: {"values": [...], "encoder_version": ...}})."""
    content = pb.Content(text=row.get("text") or "")
    for modality in ("image", "audio"):
        if row.get(modality):
            setattr(content, modality, (base_dir / row[modality]).read_bytes())
    vectors = []
    for modality, vec in (row.get("vectors") or {}).items():
        spec = vec if isinstance(vec, dict) else {"values": vec}
        vectors.append(pb.ModalityVector(modality=modality, values=spec["values"],
                                         encoder_version=spec.get("encoder_version", "")))
    return pb.ItemInput(item_id=str(row["id"]), content=content, vectors=vectors,
                        attributes={k: value_to_pb(v) for k, v in (row.get("attributes") or {}).items()})


def catalog_batches(path: Path, batch_size: int) -> Iterator[list[pb.ItemInput]]:
    """The catalog in UpsertItems-sized batches."""
    batch: list[pb.ItemInput] = []
    for row in read_jsonl(path):
        batch.append(item_to_pb(row, path.parent))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def interaction_to_pb(row: dict) -> pb.Interaction:
    return pb.Interaction(user_id=str(row["user_id"]), item_id=str(row["item_id"]),
                          kind=row.get("kind", ""), timestamp_s=float(row.get("timestamp_s", 0)))
