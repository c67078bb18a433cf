"""A small in-memory Recommender served by a real grpc server on loopback, for client and ingest tests
that are about the client side (retries, deadlines, TLS, auth, batching), not about the service.
The real service is exercised by tests/integration."""

from __future__ import annotations

import collections
import contextlib
import datetime
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc


class InMemoryRecommender(pb_grpc.RecommenderServicer):
    """Stores items by id; ``fail_next[method]`` UNAVAILABLE answers are given before serving a method;
    an item whose text is ``"reject me"`` makes its whole UpsertItems batch INVALID_ARGUMENT (all or nothing,
    as the service does); Recommend waits on ``release`` (set by default) before answering."""

    def __init__(self) -> None:
        self.items: dict[str, pb.ItemInput] = {}
        self.events: list[pb.Interaction] = []
        self.attempts: collections.Counter[str] = collections.Counter()
        self.upsert_calls: list[list[str]] = []
        self.fail_next: collections.Counter[str] = collections.Counter()
        self.metadata: list[dict[str, str]] = []
        self.release = threading.Event()
        self.release.set()
        self._lock = threading.Lock()

    def _enter(self, method: str, context) -> None:
        with self._lock:
            self.attempts[method] += 1
            self.metadata.append(dict(context.invocation_metadata()))
            failing = self.fail_next[method] > 0
            if failing:
                self.fail_next[method] -= 1
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{method} is restarting; retry")

    def Recommend(self, request, context):
        self._enter("Recommend", context)
        self.release.wait(10)
        return pb.RecommendResponse(items=[pb.ScoredItem(item_id=i, score=1.0) for i in sorted(self.items)][:request.k],
                                    request_id="req-1")

    def UpsertItems(self, request, context):
        self._enter("UpsertItems", context)
        for i, it in enumerate(request.items):
            if it.content.text == "reject me":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"items[{i}] ({it.item_id!r}): cannot encode")
        with self._lock:
            self.upsert_calls.append([it.item_id for it in request.items])
            self.items.update({it.item_id: it for it in request.items})
        return pb.UpsertItemsResponse(upserted=len(request.items))

    def GetItem(self, request, context):
        self._enter("GetItem", context)
        if request.item_id not in self.items:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no item {request.item_id!r}")
        stored = self.items[request.item_id]
        return pb.Item(item_id=stored.item_id, attributes=stored.attributes)

    def DeleteItems(self, request, context):
        self._enter("DeleteItems", context)
        found = [i for i in request.item_ids if self.items.pop(i, None) is not None]
        return pb.DeleteItemsResponse(deleted=len(found), not_found=[i for i in request.item_ids if i not in found])

    def RecordInteractions(self, request, context):
        self._enter("RecordInteractions", context)
        self.events.extend(request.interactions)
        return pb.RecordInteractionsResponse(recorded=len(request.interactions))


@contextlib.contextmanager
def serving(servicer: InMemoryRecommender, server_credentials: grpc.ServerCredentials | None = None):
    """The servicer plus standard health (SERVING) on 127.0.0.1:<free port>; yields the target."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_RecommenderServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = "127.0.0.1:0"
    port = (server.add_secure_port(address, server_credentials) if server_credentials
            else server.add_insecure_port(address))
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        servicer.release.set()
        server.stop(0)


def self_signed_cert(folder: Path, name: str = "localhost") -> tuple[Path, Path]:
    """(cert.pem, key.pem): a self-signed certificate for ``name`` and 127.0.0.1."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
