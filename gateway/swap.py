"""Swap one modality's encoder while serving (`fusionrec encoders swap`), over the running app's handles.

1. The incoming encoder starts as its own deployment, in its own Serve application
   (``<app>-swap-<modality>``): the app's deployments are not redeployed. It runs as ``SwapSettings``
   say: a fixed number of replicas (the re-encoding is a steady load that autoscaling would grow onto
   the serving cores) at a lower priority (niceness), so that Recommend keeps the CPU it needs.
2. The store collects its vectors beside the served ones (shadow vectors, retrieval/shadow.py); the
   Gateways notice within a refresh period and encode new upserts with both encoders.
3. A re-encoding job reads every item's kept content and fills the shadow vectors, in concurrent
   chunks, with progress; rerunning the command resumes where it stopped (the shadow is durable),
   and a killed encoder replica only costs a retry.
4. The fusion model is refitted for the new space (a trained model is retrained on the store with the
   shadow vectors; weighted-v0 needs no fit) and loaded in Fusion beside the served one.
5. The store switches atomically (new fused vectors, new encoder version: RetrievalEngine.commit_swap);
   Gateways follow on the next refresh or the first request that meets the new version.
6. The app's own encoder deployment is reconfigured in place to the new encoder (its ``user_config``),
   then the swap application is deleted. The other deployments keep their replicas throughout.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, Field

from fusionrec.core.errors import FailedPrecondition
from fusionrec.gateway.config import EncoderConfig, encoder_deployment_name
from fusionrec.gateway.pipeline import REFRESH_PERIOD_S
from fusionrec.gateway.routing import swap_app_name
from fusionrec.gateway.runtime import render_config
from fusionrec.retrieval.layout import MILVUS_MAX_TOPK
from fusionrec.retrieval.swap import COMMIT_BATCH_ITEMS, niced

Echo = Callable[[str], None]
RETRIES = 20  # per chunk, e.g. while Serve restarts a killed encoder replica


class SwapSettings(BaseModel):
    """How the incoming encoder and its re-encoding job run (the trade between re-encoding speed and
    serving latency on shared cores: README, `fusionrec bench swap`)."""

    model_config = ConfigDict(extra="forbid")

    chunk_items: int = Field(32, ge=1, description="Items per re-encoding call (read kept content, encode, "
                                                   "write shadow vectors).")
    concurrency: int = Field(2, ge=1, description="Re-encoding calls in flight; the incoming replicas batch "
                                                  "across them, so 2 keeps one replica busy between calls.")
    replicas: int = Field(1, ge=1, description="Replicas of the incoming encoder, fixed (no autoscaling).")
    max_batch_size: int | None = Field(None, ge=1, description="The incoming encoder's batch size; None: the "
                                                               "app's setting for that encoder.")
    niceness: int = Field(19, ge=0, le=19, description="Niceness of the incoming encoder's replicas, at least (0: "
                                                       "as Ray starts them, RAY_worker_niceness: 15 by default), so "
                                                       "Recommend preempts the re-encoding; the driver's own redeploys "
                                                       "(`serve run` processes) run at it too.")
    commit_batch_items: int = Field(COMMIT_BATCH_ITEMS, ge=1, le=MILVUS_MAX_TOPK,
                                    description="Items per batch of the commit (read, fuse, write), in the Retrieval "
                                                "replica that serves Recommend: each batch holds its interpreter "
                                                "for a while.")
    commit_busy_share: float = Field(0.5, gt=0, le=1, description="Share of the wall time the commit works, pausing "
                                                                  "between its batches so that Recommend on the same "
                                                                  "replica gets the interpreter (1: no pauses); "
                                                                  "upserts wait for the whole commit.")


def swap_encoder(modality: str, encoder: EncoderConfig, config: Path, ray_address: str = "auto", *,
                 overrides: dict[str, Any] | None = None, app_name: str = "fusionrec", echo: Echo = print,
                 settings: SwapSettings | None = None, **train_options: Any) -> dict[str, Any]:
    """Run steps 1-6 above; returns a report (versions, items re-encoded, rate, times)."""
    from ray import serve

    from fusionrec.gateway.runtime import call_handle, connect

    connect(ray_address)
    settings = settings or SwapSettings()
    retrieval = serve.get_deployment_handle("Retrieval", app_name)
    overrides = live_overrides(config, overrides, app_name)  # every redeploy below keeps what runs now
    rendered = render_config(config, overrides)["applications"][0]
    t0 = time.monotonic()
    steps: dict[str, float] = {}  # step -> s since t0 when it ended (the report's "steps_s")

    def step(name: str) -> None:
        steps[name] = round(time.monotonic() - t0, 2)

    before = call_handle(retrieval, "info", timeout_s=120)["encoder_versions"][modality]
    incoming = _start_incoming(modality, encoder, rendered, app_name, settings)
    info = call_handle(incoming, "info", timeout_s=600)
    step("incoming_started")
    status = call_handle(retrieval, "begin_swap", modality, info["version"], info["dim"], timeout_s=600)
    echo(f"swapping {modality}: -> {info['version']} ({status['done']}/{status['items']} items already re-encoded"
         f"{', resumed' if status['resumed'] else ''})")
    time.sleep(2 * REFRESH_PERIOD_S)  # every Gateway now encodes new upserts with both encoders
    reencode = asyncio.run(reencode_all(retrieval, incoming, modality, echo, settings))
    step("reencoded")
    # The driver's own work (a `serve run` process per redeploy, a refit's training) at the swap's niceness:
    # at the driver's own (0) it took the shared cores from serving (Ray runs replicas at 15).
    fusion_cfg = niced(lambda: _refit(modality, info["version"], config, ray_address, overrides, app_name, echo,
                                      **train_options), settings.niceness)
    model_version = call_handle(serve.get_deployment_handle("Fusion", app_name), "info", timeout_s=120)["version"]
    step("refitted")
    committed, switch_s = _commit(retrieval, incoming, modality, model_version, echo, settings)
    step("committed")
    echo(f"switched: {committed['items']} items now hold {modality} {info['version']}, model {model_version} "
         f"({switch_s:.1f} s)")
    niced(lambda: _adopt(modality, encoder, info["version"], rendered, fusion_cfg, config, ray_address, overrides,
                         app_name, lambda: step("adopt_redeployed")), settings.niceness)
    step("adopted")
    time.sleep(2 * REFRESH_PERIOD_S)  # Gateways route back to the app's own deployment
    serve.delete(swap_app_name(app_name, modality))
    step("incoming_deleted")
    report = {"modality": modality, "from": before, "to": info["version"], "model_version": model_version,
              **reencode, "switch_s": round(switch_s, 2),
              "swap_total_s": round(time.monotonic() - t0, 2), "steps_s": steps, "encoder": encoder.model_dump(),
              "settings": settings.model_dump()}
    echo(f"done in {report['swap_total_s']} s. To keep it across restarts, set in your config's deployments list: "
         f"- name: {encoder_deployment_name(modality)}\n    user_config: {{encoder: {encoder.model_dump()}}}")
    return report


def _commit(retrieval: Any, incoming: Any, modality: str, model_version: str, echo: Echo,
            settings: SwapSettings) -> tuple[dict[str, Any], float]:
    """The store's switch (RetrievalDeployment.commit_swap, paced by ``settings``): (its answer, seconds)."""
    from fusionrec.gateway.runtime import call_handle

    t0 = time.monotonic()
    args = (modality, model_version, settings.commit_batch_items, settings.commit_busy_share)
    try:
        committed = call_handle(retrieval, "commit_swap", *args, timeout_s=3600)
    except FailedPrecondition:  # an upsert slipped past the dual encoding: re-encode it, then switch
        asyncio.run(reencode_all(retrieval, incoming, modality, echo, settings))
        committed = call_handle(retrieval, "commit_swap", *args, timeout_s=3600)
    return committed, time.monotonic() - t0


def live_overrides(config: Path, overrides: dict[str, Any] | None, app_name: str) -> dict[str, Any]:
    """``overrides`` plus the running app's live settings a config file may not hold: the Fusion model,
    Retrieval's ranking stage and each encoder deployment's user_config (an earlier swap set its encoder
    in place)."""
    from ray import serve

    from fusionrec.gateway.config import load_serve_file
    from fusionrec.gateway.runtime import call_handle

    app_cfg = load_serve_file(config).app_config()
    names = [encoder_deployment_name(m) for m in app_cfg.encoders]
    live = {n: call_handle(serve.get_deployment_handle(n, app_name), "user_config", timeout_s=120) for n in names}
    deployments = {**(overrides or {}).get("deployments", {})}
    for n, user_config in live.items():
        deployments[n] = {**deployments.get(n, {}), "user_config": user_config}
    fusion = call_handle(serve.get_deployment_handle("Fusion", app_name), "config", timeout_s=120)
    ranking = call_handle(serve.get_deployment_handle("Retrieval", app_name), "user_config", timeout_s=120)["ranking"]
    return {"ranking": ranking, **(overrides or {}), "deployments": deployments, "fusion": fusion}


def incoming_options(modality: str, rendered: dict[str, Any], settings: SwapSettings) -> dict[str, Any]:
    """Deployment options of the incoming encoder: the app's for that deployment (``rendered``: its
    application config), but a fixed replica count, and ``settings``' batch size and niceness."""
    from fusionrec.gateway.app import deployment_options

    options = deployment_options(encoder_deployment_name(modality), rendered.get("deployments"))
    user_config = {k: v for k, v in (options.get("user_config") or {}).items() if k != "encoder"}
    if settings.max_batch_size:
        user_config["max_batch_size"] = settings.max_batch_size
    options["user_config"] = {**user_config, "niceness": settings.niceness}
    options.pop("autoscaling_config", None)
    return options | {"num_replicas": settings.replicas}


def _start_incoming(modality: str, encoder: EncoderConfig, rendered: dict[str, Any], app_name: str,
                    settings: SwapSettings | None = None) -> Any:
    """The incoming encoder as its own application (``incoming_options``)."""
    from ray import serve

    from fusionrec.gateway.deployments import EncoderDeployment

    settings = settings or SwapSettings()
    options = incoming_options(modality, rendered, settings)
    app = EncoderDeployment.options(**options).bind(modality, encoder.model_dump(), settings.niceness)
    serve.run(app, name=swap_app_name(app_name, modality), route_prefix=None)
    return serve.get_deployment_handle(encoder_deployment_name(modality), swap_app_name(app_name, modality))


async def reencode_all(retrieval: Any, incoming: Any, modality: str, echo: Echo = print,
                       settings: SwapSettings | None = None) -> dict[str, Any]:
    """Fill the shadow vectors of every item still lacking one, until none is left."""
    from tqdm import tqdm

    settings = settings or SwapSettings()
    done, failed, t0 = 0, set(), time.monotonic()
    while True:
        todo = {i: d for i, d in (await retrieval.swap_todo.remote(modality)).items() if i not in failed}
        if not todo:
            break
        pairs = list(todo.items())
        size = settings.chunk_items
        chunks = [dict(pairs[i:i + size]) for i in range(0, len(pairs), size)]
        gate = asyncio.Semaphore(settings.concurrency)
        with tqdm(total=len(todo), desc=f"re-encode {modality}", unit="item") as bar:
            async def one(chunk: dict[str, str]) -> None:
                async with gate:
                    refused = await _reencode_chunk(retrieval, incoming, modality, chunk)
                    failed.update(refused)
                    bar.update(len(chunk))

            await asyncio.gather(*(one(c) for c in chunks))
        done += len(todo)
    elapsed = time.monotonic() - t0
    rate = done / elapsed if elapsed > 0 and done else 0.0
    echo(f"re-encoded {done} items in {elapsed:.1f} s ({rate:.1f} items/s)"
         + (f"; the new encoder refused {len(failed)} (e.g. {sorted(failed)[:5]})" if failed else ""))
    return {"reembedded_items": done, "reembed_s": round(elapsed, 2), "reembed_items_per_s": round(rate, 2),
            "refused_items": sorted(failed)}


async def _reencode_chunk(retrieval: Any, incoming: Any, modality: str, digests: dict[str, str]) -> list[str]:
    """Re-encode the kept content (item id -> digest) into shadow vectors; returns the ids the new
    encoder refused."""
    for attempt in range(RETRIES):
        try:
            contents = await retrieval.read_digests.remote(list(digests.values()))
            keys = list(digests)
            raw = [contents[digests[i]] for i in keys]
            vectors = await incoming.encode_many.remote([c.decode("utf-8") for c in raw] if modality == "text" else raw)
            good = {i: v for i, v in zip(keys, vectors) if not isinstance(v, Exception)}
            await retrieval.put_shadow.remote(modality, good)
            return [i for i in keys if i not in good]
        except Exception:  # a replica restarting (killed, redeployed): wait and retry the chunk
            await asyncio.sleep(min(0.5 * 2 ** attempt, 5.0))
    raise RuntimeError(f"re-encoding {len(digests)} {modality} items kept failing; rerun to resume")


def _refit(modality: str, version: str, config: Path, ray_address: str, overrides: dict[str, Any] | None,
           app_name: str, echo: Echo, **train_options: Any) -> dict[str, Any]:
    """Load a fusion model made for the incoming encoder into Fusion (beside the served one)."""
    from ray import serve

    from fusionrec.gateway.runtime import call_handle, redeploy

    current = call_handle(serve.get_deployment_handle("Fusion", app_name), "config", timeout_s=120)
    cfg = {**current, "encoder_versions": {**current.get("encoder_versions", {}), modality: version}}
    if current["name"] == "trained":
        from fusionrec.fusion.train.from_store import train_from_snapshot

        snapshot = call_handle(serve.get_deployment_handle("Retrieval", app_name), "training_snapshot", modality,
                               timeout_s=600)
        report = train_from_snapshot(snapshot, None, echo=echo, **train_options)
        echo(f"refitted the fusion model for {modality} {version}: {report['candidate']['model_version']}")
        cfg["options"] = {**current.get("options", {}), "checkpoint": report["checkpoint"]}
    redeploy(config, ray_address, overrides={**(overrides or {}), "fusion": cfg})
    return cfg


def _adopt(modality: str, encoder: EncoderConfig, version: str, rendered: dict[str, Any], fusion_cfg: dict[str, Any],
           config: Path, ray_address: str, overrides: dict[str, Any] | None, app_name: str,
           redeployed: Callable[[], None] = lambda: None) -> None:
    """The app's own encoder deployment runs the new encoder (in place), and waits until it does
    (``redeployed`` is called once Serve has the new config)."""
    from ray import serve

    from fusionrec.gateway.runtime import call_handle, redeploy

    name = encoder_deployment_name(modality)
    entry = next((d for d in rendered.get("deployments") or [] if d.get("name") == name), {})
    user_config = {**(entry.get("user_config") or {}), "encoder": encoder.model_dump()}
    changes = {**(overrides or {}).get("deployments", {}), name: {"user_config": user_config}}
    redeploy(config, ray_address, overrides={**(overrides or {}), "fusion": fusion_cfg, "deployments": changes})
    redeployed()
    own = serve.get_deployment_handle(name, app_name)
    deadline = time.monotonic() + 600
    while call_handle(own, "info", timeout_s=120)["version"] != version:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} did not switch to {version}")
        time.sleep(1)
