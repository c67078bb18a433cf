"""How an encoder swap's incoming encoder runs (gateway/swap.py SwapSettings): a fixed replica count, its
batch size and a lower priority for every thread of its replica; and the swap benchmark's distinct images."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fusionrec.core.paths import default_config
from fusionrec.gateway.config import EncoderUserConfig
from fusionrec.gateway.runtime import render_config
from fusionrec.gateway.swap import SwapSettings, incoming_options


def test_the_incoming_encoder_gets_fixed_replicas_its_batch_size_and_niceness():
    rendered = render_config(default_config(), {})["applications"][0]
    app_own = next(d for d in rendered["deployments"] if d["name"] == "ImageEncoder")
    assert "autoscaling_config" in app_own  # the app's own encoder autoscales ...

    options = incoming_options("image", rendered, SwapSettings(replicas=1, max_batch_size=2, niceness=10))
    assert "autoscaling_config" not in options and options["num_replicas"] == 1  # ... the re-encoding one does not
    assert options["name"] == "ImageEncoder"
    assert options["ray_actor_options"] == app_own["ray_actor_options"]
    user_config = EncoderUserConfig.model_validate(options["user_config"])  # what its replicas will apply
    assert (user_config.max_batch_size, user_config.niceness, user_config.encoder) == (2, 10, None)
    assert user_config.batch_wait_timeout_s == app_own["user_config"]["batch_wait_timeout_s"]

    kept = incoming_options("image", rendered, SwapSettings(max_batch_size=None, niceness=0))
    assert kept["user_config"]["max_batch_size"] == app_own["user_config"]["max_batch_size"]


def test_swap_settings_refuse_out_of_range_values():
    for bad in ({"niceness": 20}, {"niceness": -1}, {"replicas": 0}, {"chunk_items": 0}, {"typo": 1}):
        with pytest.raises(ValueError):
            SwapSettings(**bad)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="per-thread niceness is Linux's")
def test_lower_priority_reaches_every_thread_and_the_threads_started_later():
    script = textwrap.dedent("""
        import os, threading
        from fusionrec.gateway.deployments import lower_priority

        hold = threading.Event()
        early = threading.Thread(target=hold.wait); early.start()
        lower_priority(0)  # 0: nothing changes
        print(sorted({os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}))
        lower_priority(7)
        late = threading.Thread(target=hold.wait); late.start()
        lower_priority(3)  # never raises the priority back
        print(sorted({os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")}))
        hold.set()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    start = int(subprocess.run(["nice"], capture_output=True, text=True).stdout)  # this test's own niceness
    assert out.stdout.split("\n")[:2] == [f"[{start}]", f"[{max(start, 7)}]"], out.stderr


def test_swap_benchmark_images_are_distinct_and_decodable():
    from PIL import Image
    import io

    from fusionrec.bench.swap import variant
    from fusionrec.core.paths import shared_path

    photo = (shared_path("media") / "images" / "chelsea.png").read_bytes()
    images = [variant(photo, k) for k in range(49)]
    assert len({hashlib.sha256(b).hexdigest() for b in images}) == 49  # distinct content hashes
    sizes = {Image.open(io.BytesIO(b)).size for b in images}
    assert len(sizes) == 1 and next(iter(sizes))[0] > 200
