"""Synthetic catalogs for load tests: clustered low-rank vectors per modality, sent as bring-your-own vectors."""

from __future__ import annotations

from typing import Callable

import numpy as np

from fusionrec.v1 import recommender_pb2 as pb
from fusionrec.cli.client import Client
from fusionrec.gateway.convert import value_to_pb

N_CATEGORIES = 20  # one category is ~5 % of the catalog: the filtered benchmark's selectivity


def clustered_vectors(n: int, dim: int, rng: np.random.Generator, clusters: np.ndarray, n_clusters: int,
                      rank: int = 32, noise: float = 0.35) -> np.ndarray:
    """(n, dim) unit rows: a cluster centre plus a low-rank within-cluster part plus noise.

    Uniform random vectors are the hardest case for ANN and unlike real embeddings.
    """
    centres = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    basis = rng.standard_normal((rank, dim)).astype(np.float32) / np.sqrt(rank)
    x = centres[clusters] + rng.standard_normal((n, rank)).astype(np.float32) @ basis
    x += noise * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def user_ids(n_users: int) -> list[str]:
    """The synthetic users seed_catalog records interactions for."""
    return [f"syn-user-{u:05d}" for u in range(n_users)]


def _attributes(i: int) -> dict[str, str | float]:
    return {"category": f"c{i % N_CATEGORIES:02d}", "year": float(1990 + i % 35), "price": float(i % 100)}


def _item_id(i: int) -> str:
    return f"syn-{i:07d}"


def _synthetic(n_items: int, modality_dims: dict[str, int], seed: int
               ) -> tuple[np.random.Generator, np.ndarray, dict[str, np.ndarray]]:
    """(rng, cluster of each item, modality -> (n_items, dim) vectors): one signal shared by all modalities."""
    rng = np.random.default_rng(seed)
    n_clusters = 64
    clusters = rng.integers(0, n_clusters, n_items)
    vectors = {m: clustered_vectors(n_items, d, rng, clusters, n_clusters) for m, d in modality_dims.items()}
    return rng, clusters, vectors


def _record_users(client: Client, clusters: np.ndarray, n_users: int, events_per_user: int,
                  rng: np.random.Generator) -> list[str]:
    """Each user views items of one cluster (their taste), through RecordInteractions."""
    n_clusters = int(clusters.max()) + 1
    users = user_ids(n_users)
    events = []
    for u, user in enumerate(users):
        taste = np.flatnonzero(clusters == u % n_clusters)
        picks = rng.choice(taste, size=min(events_per_user, len(taste)), replace=False)
        events += [pb.Interaction(user_id=user, item_id=_item_id(i), kind="view", timestamp_s=1e9 + t)
                   for t, i in enumerate(picks)]
    for start in range(0, len(events), 10_000):
        client.stub.RecordInteractions(pb.RecordInteractionsRequest(interactions=events[start:start + 10_000]),
                                       timeout=300, metadata=client.metadata)
    return users


def seed_catalog(client: Client, n_items: int, n_users: int, modality_dims: dict[str, int],
                 encoder_versions: dict[str, str], batch_size: int = 256, events_per_user: int = 20,
                 seed: int = 0, progress: Callable[[int], None] | None = None) -> list[str]:
    """Upsert n_items synthetic items (UpsertItems, bring-your-own vectors) and n_users users'
    interactions; returns the user ids."""
    rng, clusters, vectors = _synthetic(n_items, modality_dims, seed)
    for start in range(0, n_items, batch_size):
        items = []
        for i in range(start, min(start + batch_size, n_items)):
            items.append(pb.ItemInput(
                item_id=_item_id(i), attributes={k: value_to_pb(v) for k, v in _attributes(i).items()},
                vectors=[pb.ModalityVector(modality=m, values=vectors[m][i], encoder_version=encoder_versions.get(m, ""))
                         for m in modality_dims]))
        client.stub.UpsertItems(pb.UpsertItemsRequest(items=items), timeout=300, metadata=client.metadata)
        if progress:
            progress(len(items))
    return _record_users(client, clusters, n_users, events_per_user, rng)


def seed_store(client: Client, app_name: str, n_items: int, n_users: int, batch_size: int = 2000,
               events_per_user: int = 20, seed: int = 0, progress: Callable[[int], None] | None = None) -> list[str]:
    """The same catalog as ``seed_catalog``, written through the deployments' store path: Fusion's
    item tower, then Retrieval.upsert, in large batches (no per-item gRPC conversion, no Gateway hop;
    the store's own insert rate is the limit). Needs this process connected to the app's Ray cluster."""
    from ray import serve

    from fusionrec.gateway.runtime import call_handle
    from fusionrec.retrieval.base import StoredItem

    retrieval = serve.get_deployment_handle("Retrieval", app_name)
    fusion = serve.get_deployment_handle("Fusion", app_name)
    info = call_handle(retrieval, "info")
    model_version = info["model_version"]
    rng, clusters, vectors = _synthetic(n_items, dict(info["modality_dims"]), seed)
    for start in range(0, n_items, batch_size):
        rows = range(start, min(start + batch_size, n_items))
        per_item = [{m: v[i] for m, v in vectors.items()} for i in rows]
        fused = call_handle(fusion, "item_vectors", per_item, [_item_id(i) for i in rows], model_version,
                            timeout_s=300)
        items = [StoredItem(_item_id(i), _attributes(i), mv, f, dict(info["encoder_versions"]), model_version)
                 for i, mv, f in zip(rows, per_item, fused)]
        call_handle(retrieval, "upsert", items, timeout_s=600)
        if progress:
            progress(len(items))
    return _record_users(client, clusters, n_users, events_per_user, rng)
