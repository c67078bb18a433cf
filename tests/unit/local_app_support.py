"""The Serve application's own classes in one process, without Ray, behind the real front door.

Every deployment class (the text encoder, Fusion, Retrieval on a Milvus Lite file) is instantiated
from its Serve wrapper and called through `LocalHandle`, which keeps DeploymentHandle's calling
convention (``handle.method.remote(...)`` -> an awaitable with ``cancel()``); the Recommender,
servicer and `create_server` are the real ones. For front-door tests that need RPCs to succeed
(request ids, traces); tests/integration runs the same classes under Ray Serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from pathlib import Path
from typing import Any, Iterator

import grpc

from fusionrec.gateway.config import EncoderConfig, EncoderUserConfig, FusionConfig, LimitsConfig, ServerConfig, \
    StoreConfig
from fusionrec.gateway.deployments import EncoderDeployment, FusionDeployment, RetrievalDeployment
from fusionrec.gateway.pipeline import Recommender
from fusionrec.gateway.server import create_server
from fusionrec.gateway.service import RecommenderServicer
from fusionrec.gateway.tracing import Tracing
from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.v1 import recommender_pb2_grpc as pb_grpc
from loop_support import LoopThread

TEXTS = ["a calm photo of a cat on a sofa", "a dark espresso in a small cup", "a rocket launch at dawn",
         "red flowers in a summer garden", "a horse running on a beach", "an astronaut floating in space"]


class LocalHandle:
    """``handle.method.remote(*args)`` on an object in this process: a Task running the method."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> "_Method":
        return _Method(getattr(self._target, name))


class _Method:
    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> asyncio.Task:
        return asyncio.ensure_future(self._call(*args, **kwargs))

    async def _call(self, *args: Any, **kwargs: Any) -> Any:
        result = self._fn(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result


class _Unbatched:
    """An EncoderDeployment's methods minus @serve.batch (which needs a Serve replica): each call
    encodes its inputs as one batch, through the deployment's own batch function."""

    def __init__(self, deployment: Any) -> None:
        self._deployment = deployment

    def info(self) -> dict[str, Any]:
        return self._deployment.info()

    async def encode(self, content: str | bytes) -> Any:
        (result,) = await asyncio.to_thread(self._deployment._encode_isolated, [content])
        if isinstance(result, Exception):
            raise result
        return result

    async def encode_many(self, contents: list[str | bytes]) -> list[Any]:
        return await asyncio.to_thread(self._deployment._encode_isolated, contents)


async def _constructed(deployment: Any, *args: Any) -> Any:
    """An instance of a deployment's class; Serve awaits an async __init__, so do we."""
    cls = deployment.func_or_class
    obj = cls.__new__(cls)
    result = cls.__init__(obj, *args)
    if inspect.isawaitable(result):
        await result
    return obj


async def build_deployments(tmp: Path) -> tuple[dict[str, LocalHandle], LocalHandle, Any]:
    """The text encoder, Fusion (weighted-v0) and Retrieval (Milvus Lite under ``tmp``), loaded.
    Returns (encoder handles, fusion handle, the Retrieval instance: close its engine when done)."""
    text = await _constructed(EncoderDeployment, "text",
                              EncoderConfig(name="minilm-l6-v2", options={"num_threads": 1}).model_dump())
    text.reconfigure(EncoderUserConfig().model_dump())
    encoders = {"text": LocalHandle(_Unbatched(text))}
    fusion = await _constructed(FusionDeployment, encoders, {})
    fusion.reconfigure(FusionConfig().model_dump())
    store = StoreConfig(uri=str(tmp / "items.db"), content_uri=str(tmp / "content"))
    retrieval = await _constructed(RetrievalDeployment, store.model_dump(), encoders, LocalHandle(fusion), {})
    return encoders, LocalHandle(fusion), retrieval


async def _loaded(recommender: Recommender) -> Recommender:
    await recommender.load()
    return recommender


class LocalApp:
    """The front door on its own loop over the in-process app; ``stub`` calls it over real gRPC."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._loop = LoopThread()
        self._loop.start()
        self._encoders, self._fusion, self._retrieval = self._loop.call(build_deployments(tmp))

    @contextlib.contextmanager
    def serving(self, cfg: ServerConfig, tracing: Tracing | None = None) -> Iterator[pb_grpc.RecommenderStub]:
        """A started front door with ``cfg`` (port 0 is picked), start-up marked complete."""
        cfg = cfg.model_copy(update={"port": 0})
        recommender = self._loop.call(_loaded(Recommender(self._encoders, self._fusion, LocalHandle(self._retrieval),
                                                          LimitsConfig(), cfg)))
        servicer = RecommenderServicer(recommender, cfg.default_deadline_ms, cfg.max_call_ms)
        server, port, health = self._loop.call(create_server(servicer, cfg, tracing=tracing))
        health.started = True
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            yield pb_grpc.RecommenderStub(channel)
        finally:
            channel.close()
            self._loop.call(server.stop(0))

    def load_items(self, stub: pb_grpc.RecommenderStub) -> list[str]:
        """Upsert one text item per TEXTS entry; returns their ids."""
        ids = [f"item-{i}" for i in range(len(TEXTS))]
        items = [pb.ItemInput(item_id=i, content=pb.Content(text=t)) for i, t in zip(ids, TEXTS)]
        assert stub.UpsertItems(pb.UpsertItemsRequest(items=items), timeout=120).upserted == len(ids)
        return ids

    def close(self) -> None:
        self._loop.call(asyncio.to_thread(self._retrieval.engine.close))
        self._loop.loop.call_soon_threadsafe(self._loop.loop.stop)
