"""Autoscaling for real: image-query load scales the ImageEncoder deployment from 1 to 2 live replicas, and it
returns to 1 once the load stops, with every call answered throughout."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from fusionrec.bench.autoscale import ReplicaPoller
from fusionrec.core.paths import default_config
from fusionrec.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.integration

ENCODER = "ImageEncoder"
#: Short windows so that a test sees both directions in well under a minute (deploy/local.yaml keeps
#: Serve's default 10 s metrics push and 30 s look-back, and a 30 s downscale delay).
FAST = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 0.5,
        "downscale_delay_s": 2, "metrics_interval_s": 0.5, "look_back_period_s": 2}


class ImageLoad(threading.Thread):
    """Closed-loop Recommend calls with an image query; every call's status code."""

    def __init__(self, client, images: list[bytes], callers: int) -> None:
        super().__init__(daemon=True)
        self.client, self.images, self.callers = client, images, callers
        self.codes: list[str] = []
        self.stop = threading.Event()

    def _caller(self, i: int) -> None:
        k = i
        while not self.stop.is_set():
            request = pb.RecommendRequest(k=5, query=pb.Content(image=self.images[k % len(self.images)]))
            try:
                self.client.stub.Recommend(request, timeout=30)
                self.codes.append("OK")
            except grpc.RpcError as err:
                self.codes.append(err.code().name)
            k += self.callers

    def run(self) -> None:
        threads = [threading.Thread(target=self._caller, args=(i,), daemon=True) for i in range(self.callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _wait_for(poller: ReplicaPoller, live: int, timeout_s: float) -> float | None:
    """Seconds until the encoder had `live` live replicas and no other replica actor (starting or
    stopping), or None."""
    from fusionrec.gateway.runtime import replica_ids

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if poller.latest().get(ENCODER) == (live, 0) and len(replica_ids(poller.app_name).get(ENCODER, ())) == live:
            return time.monotonic() - t0
        time.sleep(0.25)
    return None


def test_encoder_scales_up_under_load_and_back_down(service, client, loaded):
    from fusionrec.gateway.runtime import redeploy, replica_ids

    images = [(loaded["dir"] / row["image"]).read_bytes() for row in loaded["items"].values() if row.get("image")][:8]
    redeploy(default_config(), overrides={**service.overrides, "deployments": {ENCODER: {"autoscaling_config": FAST}}})
    poller = ReplicaPoller(service.app_name, 0.25, time.monotonic())
    poller.start()
    load = ImageLoad(client, images, callers=6)
    try:
        assert _wait_for(poller, 1, 60) is not None, poller.latest()  # the floor, before any load
        first = replica_ids(service.app_name)[ENCODER]
        load.start()
        up_s = _wait_for(poller, 2, 60)
        assert up_s is not None, f"{ENCODER} never reached 2 live replicas under load: {poller.samples[ENCODER][-5:]}"
        assert first < replica_ids(service.app_name)[ENCODER]  # a replica was added, the first one kept
        load.stop.set()
        load.join(timeout=60)
        down_s = _wait_for(poller, 1, 60)
        assert down_s is not None, f"{ENCODER} stayed above 1 replica after the load: {poller.samples[ENCODER][-5:]}"
        assert len(replica_ids(service.app_name)[ENCODER]) == 1
        assert load.codes and set(load.codes) == {"OK"}, {c: load.codes.count(c) for c in set(load.codes)}
        print(f"{ENCODER}: 1 -> 2 live replicas {up_s:.1f} s into the load, back to 1 {down_s:.1f} s after it "
              f"({len(load.codes)} calls, all OK)")
    finally:
        load.stop.set()
        poller.stop.set()
        # Back to the session's settings (the file's autoscaling_config), for the tests after this one.
        redeploy(default_config(), overrides=service.overrides)
