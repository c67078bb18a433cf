"""Per-deployment settings live in Serve's `deployments:` list: changing one deployment's settings
updates that deployment only, and every other deployment keeps its replicas."""

from __future__ import annotations

import time

import pytest

from fusionrec.core.paths import default_config
from fusionrec.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.integration


def replicas(app_name: str) -> dict[str, set[str]]:
    """Deployment name -> the ids of its live replica actors."""
    from fusionrec.gateway.runtime import replica_ids

    return replica_ids(app_name)


def test_one_encoder_setting_changes_only_that_encoder(service, client, loaded):
    from fusionrec.gateway.runtime import redeploy

    before = replicas(service.app_name)
    assert set(before) == {"Gateway", "TextEncoder", "ImageEncoder", "AudioEncoder", "Fusion", "Retrieval"}
    autoscaling = {"min_replicas": 2, "max_replicas": 3, "target_ongoing_requests": 4,
                   "upscale_delay_s": 1, "downscale_delay_s": 5}
    redeploy(default_config(), overrides={**service.overrides, "deployments": {"TextEncoder": {
        "autoscaling_config": autoscaling}}})
    deadline = time.monotonic() + 180
    while len(replicas(service.app_name).get("TextEncoder", ())) < 2 and time.monotonic() < deadline:
        time.sleep(1)
    after = replicas(service.app_name)
    assert len(after["TextEncoder"]) >= 2, after  # the new floor took effect ...
    assert before["TextEncoder"] <= after["TextEncoder"]  # ... by adding a replica, not restarting one
    for name in ("Gateway", "ImageEncoder", "AudioEncoder", "Fusion", "Retrieval"):
        assert after[name] == before[name], f"{name} was restarted by a TextEncoder setting"
    reply = client.stub.Recommend(pb.RecommendRequest(query=pb.Content(text="a calm cat"), k=3), timeout=30)
    assert len(reply.items) == 3 and "text" in reply.modalities_used
