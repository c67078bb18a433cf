"""reports/reliability.*: each target judged against its goal, sections that did not run left out."""

from __future__ import annotations

import json

from fusionrec.bench.reliability import report


def _report(lost: int, ratio: float | None) -> dict:
    return {"date": "d", "config": "c",
            "faults": {"acknowledged": 10, "lost": lost, "read_missing_during_load": 0, "lost_ids": [],
                       "recovery_s": {"Retrieval": 9.5, "Fusion": None}, "failed_calls": {"Retrieval": 3},
                       "calls_failed": {}},
            "overload": {"admitted_p99_ratio": ratio, "shed_median_ms": 3.0, "saturation_qps": 50.0,
                         "saturation_concurrency": 8, "unloaded_p99_ms": 30.0, "offered_qps": 100.0,
                         "sent_qps": 99.0, "deadline_ms": 1000.0, "admitted_p50_ms": 20.0, "admitted_p99_ms": 50.0,
                         "shed_fraction": 0.4, "failed_other_fraction": 0.0, "codes": {}}}


def test_targets_pass_and_fail_on_their_goals():
    verdicts = {v["key"]: v["pass"] for v in report.verdicts(_report(lost=0, ratio=1.9))}
    assert verdicts == {"faults.lost": True, "overload.admitted_p99_ratio": True, "overload.shed_median_ms": True}
    verdicts = {v["key"]: v["pass"] for v in report.verdicts(_report(lost=1, ratio=2.5))}
    assert not verdicts["faults.lost"] and not verdicts["overload.admitted_p99_ratio"]
    assert not {v["key"]: v["pass"] for v in report.verdicts(_report(lost=0, ratio=None))}["overload.admitted_p99_ratio"]


def test_write_gives_json_and_a_table_naming_each_failure(tmp_path):
    path = report.write(_report(lost=2, ratio=1.0), tmp_path)
    saved = json.loads(path.read_text())
    assert [v["pass"] for v in saved["verdicts"]] == [False, True, True]
    md = (tmp_path / "reliability.md").read_text()
    assert "| acknowledged writes lost (`faults.lost`) | 2 | 0 | **FAIL** |" in md
    assert "| Fusion | **not recovered** in time | n/a |" in md  # a deployment that never recovered
    assert "| Retrieval | 9.5 | 3 |" in md
    assert not (tmp_path / "reliability.png").exists()  # no soak, no plot


def test_a_section_that_could_not_run_fails_its_targets_and_says_why(tmp_path):
    rep = _report(lost=0, ratio=1.0) | {"soak": {"error": "RuntimeError('boom')"}}
    report.write(rep, tmp_path)
    assert [v["pass"] for v in rep["verdicts"] if v["key"].startswith("soak.")] == [False, False]
    assert "**Could not run**: `RuntimeError('boom')`" in (tmp_path / "reliability.md").read_text()


def test_soak_growth_from_single_samples_and_from_minute_medians(tmp_path):
    """The target compares the first and the last sample; the medians of the first and last minute are
    reported beside it, unmoved by a last sample caught at a flush's peak."""
    from fusionrec.bench.reliability.soak import median_growth, relative_growth

    mib = 2**20
    samples = [(60 + 15 * i, {"Retrieval#1": (300 + (20 if i == 40 else i % 2)) * mib, "Gateway#2": 200 * mib})
               for i in range(41)]  # flat within a 1 MiB saw-tooth, a +20 MiB spike as the last sample
    assert relative_growth(samples[0][1], samples[-1][1])["Retrieval#1"] > 0.06
    smoothed = median_growth(samples, window_s=60)
    assert abs(smoothed["Retrieval#1"]) < 0.005 and smoothed["Gateway#2"] == 0.0
    soak = {"duration_s": 600.0, "warmup_s": 60.0, "calls_ok": {}, "errors": 0, "errors_by_call": {},
            "rss_growth": relative_growth(samples[0][1], samples[-1][1]), "rss_growth_median": smoothed,
            "rss_growth_max": 0.067, "rss_mb": []}
    report.write({"date": "d", "config": "c", "soak": soak}, tmp_path)
    md = (tmp_path / "reliability.md").read_text()
    assert "(end of warm-up to end): Gateway#2 +0.0%, Retrieval#1 +6.7%." in md
    assert "trough does not move it): Gateway#2 +0.0%, Retrieval#1 +0.3%." in md
