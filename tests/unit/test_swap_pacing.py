"""How an encoder swap keeps its work off serving's way: the commit's pacing between batches and the
driver's work at a low priority (retrieval/swap.py ``paced``, ``niced``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from fusionrec.retrieval.swap import niced, paced


def test_paced_yields_every_batch_in_order_and_pauses_in_proportion() -> None:
    work_s = 0.02
    t0 = time.perf_counter()
    seen = []
    for batch in paced(iter([[1, 2], [3], [4, 5, 6]]), busy_share=0.25):
        time.sleep(work_s)  # the consumer's work on the batch
        seen.append(batch)
    elapsed = time.perf_counter() - t0
    assert seen == [[1, 2], [3], [4, 5, 6]]
    # 3 batches of work_s each, then a pause of 3x as long after each: at least 4x the work in all
    assert elapsed >= 0.95 * 4 * 3 * work_s


def test_paced_at_full_share_adds_no_pause() -> None:
    t0 = time.perf_counter()
    assert list(paced(range(1000), busy_share=1.0)) == list(range(1000))
    assert time.perf_counter() - t0 < 1.0  # 1000 pauses of any length would not fit


@pytest.mark.parametrize("share", [0, -0.5, 1.5])
def test_paced_rejects_a_share_outside_0_1(share: float) -> None:
    with pytest.raises(ValueError, match="busy_share"):
        list(paced([[1]], share))


def test_niced_runs_fn_and_the_processes_it_starts_at_the_niceness() -> None:
    here = os.nice(0)
    want = min(19, here + 3)

    def child_niceness() -> int:
        out = subprocess.run([sys.executable, "-c", "import os; print(os.nice(0))"], capture_output=True, text=True,
                             check=True)
        return int(out.stdout)

    assert niced(child_niceness, want) == want
    assert os.nice(0) == here  # the caller's thread keeps its own


def test_niced_reraises_the_error_in_the_caller() -> None:
    def fail() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        niced(fail, 19)
