"""Concurrent write + read traffic over gRPC, counting every answer by operation and status.

Writers upsert small batches cycling through the modalities (a bring-your-own vector, text, image and
audio content) so every encoder, Fusion and Retrieval sit on the write path, and record interactions;
readers call Recommend (by user, with a text query) and GetItem on acknowledged ids. A write counts as
acknowledged only when its call returned OK; an acknowledged id GetItem cannot find is `read_missing`.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import numpy as np

from fusionrec.bench.reliability import media
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc


ERROR_PAUSE_S = 0.25  # a caller backs off after a failure (a restarting service is not hammered)


@dataclass
class TrafficPlan:
    writers: int = 2
    readers: int = 2
    batch_items: int = 2
    pause_s: float = 0.05  # between one caller's calls: steady load, not saturation
    timeout_s: float = 10.0
    id_prefix: str = "rel"
    #: None: every write a new id (acknowledged ids are verified later); N: ids cycle over N per writer,
    #: so the store's size stays flat (a soak measures leaks, not data growth).
    id_space: int | None = None


@dataclass
class Counts:
    ok: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # "op:CODE" -> n
    read_missing: int = 0

    def error_total(self) -> int:
        return sum(self.errors.values())


class Traffic:
    """Background callers against ``target``; `start`, then `stop` returns the counts."""

    def __init__(self, target: str, token: str, versions: dict[str, str], dim: int, plan: TrafficPlan,
                 users: list[str]) -> None:
        self.plan = plan
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.RecommenderStub(self.channel)
        self.versions, self.dim, self.users = versions, dim, users
        self.acked: list[str] = []
        self.counts = Counts()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._image, self._audio = media.picture(size=(96, 96), fmt="JPEG"), media.tone(1.0)

    def start(self) -> "Traffic":
        for w in range(self.plan.writers):
            self._threads.append(threading.Thread(target=self._writer, args=(w,), daemon=True))
        for r in range(self.plan.readers):
            self._threads.append(threading.Thread(target=self._reader, args=(r,), daemon=True))
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> Counts:
        self._stop.set()
        for t in self._threads:
            t.join(self.plan.timeout_s + 5)
        self.channel.close()
        return self.counts

    def _call(self, op: str, method, request) -> object | None:
        try:
            reply = method(request, timeout=self.plan.timeout_s, metadata=self.metadata)
        except grpc.RpcError as err:
            with self._lock:
                self.counts.errors[f"{op}:{err.code().name}"] += 1
            self._stop.wait(ERROR_PAUSE_S)
            return None
        with self._lock:
            self.counts.ok[op] += 1
        return reply

    def _item(self, item_id: str, n: int, rng: np.random.Generator) -> pb.ItemInput:
        attrs = {"year": pb.AttributeValue(number_value=float(2000 + n % 20))}
        kind = n % 4
        if kind == 0:
            vec = pb.ModalityVector(modality="text", values=rng.standard_normal(self.dim).tolist(),
                                    encoder_version=self.versions.get("text", ""))
            return pb.ItemInput(item_id=item_id, attributes=attrs, vectors=[vec])
        content = [pb.Content(text=f"item {n}: a calm photo of a cat number {n}"), pb.Content(image=self._image),
                   pb.Content(audio=self._audio)][kind - 1]
        return pb.ItemInput(item_id=item_id, attributes=attrs, content=content)

    def _writer(self, w: int) -> None:
        rng, n = np.random.default_rng(w), 0
        while not self._stop.is_set():
            slot = n if self.plan.id_space is None else n % self.plan.id_space
            ids = [f"{self.plan.id_prefix}-{w}-{slot}-{j}" for j in range(self.plan.batch_items)]
            items = [self._item(i, n, rng) for i in ids]
            if self._call("upsert", self.stub.UpsertItems, pb.UpsertItemsRequest(items=items)) is not None:
                with self._lock:
                    self.acked.extend(i for i in ids if self.plan.id_space is None or i not in self.acked)
                if n % 5 == 0:
                    event = pb.Interaction(user_id=self.users[n % len(self.users)], item_id=ids[0], kind="view",
                                           timestamp_s=time.time())
                    self._call("interactions", self.stub.RecordInteractions,
                               pb.RecordInteractionsRequest(interactions=[event]))
            n += 1
            self._stop.wait(self.plan.pause_s)

    def _reader(self, r: int) -> None:
        rng = random.Random(r)
        while not self._stop.is_set():
            roll = rng.random()
            with self._lock:
                known = rng.choice(self.acked) if self.acked else None
            if roll < 0.4 or known is None:
                self._call("recommend", self.stub.Recommend, pb.RecommendRequest(user_id=rng.choice(self.users), k=10))
            elif roll < 0.6:
                self._call("recommend_text", self.stub.Recommend, pb.RecommendRequest(
                    user_id=rng.choice(self.users), k=10, query=pb.Content(text="a calm cat")))
            else:
                self._get(known)
            self._stop.wait(self.plan.pause_s)

    def _get(self, item_id: str) -> None:
        try:
            self.stub.GetItem(pb.GetItemRequest(item_id=item_id), timeout=self.plan.timeout_s, metadata=self.metadata)
        except grpc.RpcError as err:
            with self._lock:
                if err.code() == grpc.StatusCode.NOT_FOUND:
                    self.counts.read_missing += 1
                self.counts.errors[f"get:{err.code().name}"] += 1
            self._stop.wait(ERROR_PAUSE_S)
            return
        with self._lock:
            self.counts.ok["get"] += 1


def missing(target: str, token: str, item_ids: list[str], timeout_s: float = 30.0) -> list[str]:
    """The ids GetItem does not find (retrying other failures a few times: the service may be restarting)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    lost = []
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        for item_id in item_ids:
            for attempt in range(5):
                try:
                    stub.GetItem(pb.GetItemRequest(item_id=item_id), timeout=timeout_s, metadata=metadata)
                    break
                except grpc.RpcError as err:
                    if err.code() == grpc.StatusCode.NOT_FOUND:
                        lost.append(item_id)
                        break
                    time.sleep(1 + attempt)
            else:
                lost.append(item_id)
    return lost
