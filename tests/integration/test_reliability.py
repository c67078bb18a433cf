"""The reliability harness (bench/reliability) in CI, through the same code as `make reliability`, on its
own service (a process tree of its own, a fresh store, a token required, so the session's store is left
alone): every hostile-input case gets its expected status and the server still answers afterwards; a
Retrieval replica killed -9 under concurrent writes and reads loses no acknowledged write."""

from __future__ import annotations

import pytest

from fusionrec.bench.reliability import hostile
from fusionrec.bench.reliability.faults import run_faults
from fusionrec.bench.reliability.service import ServiceProcess
from fusionrec.bench.reliability.suite import TOKEN
from fusionrec.bench.reliability.traffic import TrafficPlan
from fusionrec.core.paths import default_config

EVERY_RPC = {"Recommend", "UpsertItems", "DeleteItems", "GetItem", "RecordInteractions", "Health.Check"}


@pytest.fixture(scope="module")
def own_service(tmp_path_factory):
    service = ServiceProcess(default_config(), tmp_path_factory.mktemp("reliability"), token=TOKEN)
    try:
        service.start()
        yield service
    finally:
        service.stop()


def _table(cases: list[dict]) -> str:
    return "\n".join(f"{c['name']}: got {c['got']}, expected {'/'.join(c['expected'])}: {c['message']}"
                     for c in cases)


def test_every_hostile_case_gets_its_expected_status(own_service):
    result = hostile.run_hostile(own_service.target, TOKEN)
    assert result["cases"] >= 60
    assert set(result["rpcs"]) == EVERY_RPC
    assert any(o["got"] == "UNAUTHENTICATED" for o in result["outcomes"])  # the token cases ran
    assert result["unexpected"] == 0, _table(result["unexpected_cases"])
    assert result["server_alive_after_all"]


def test_retrieval_replica_killed_under_load_loses_no_acknowledged_write(own_service):
    with hostile.open_channel(own_service.target) as channel:
        versions = hostile.seed_base(channel, TOKEN)
    faults = run_faults(own_service, versions, hostile.DEFAULT_DIMS["text"], deployments=("Retrieval",),
                        whole_tree=False, settle_s=3.0, plan=TrafficPlan(id_prefix="ci-fault"), log=print)
    assert faults["acknowledged"] > 0
    assert faults["recovery_s"]["Retrieval"] is not None, faults
    assert faults["lost"] == 0, faults["lost_ids"]
    assert faults["read_missing_during_load"] == 0
