"""Train the fusion net a few steps on synthetic data, export, and serve it through the registry."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from fusionrec.fusion.registry import get_fusion_model
from fusionrec.fusion.train.config import TrainConfig, get_variant
from fusionrec.fusion.train.data import InteractionData
from fusionrec.fusion.train.ensemble import EnsembleNet
from fusionrec.fusion.train.export import export_payload, save_checkpoint
from fusionrec.fusion.train.training import pad_histories, train

DIMS = {"text": 12, "vggish": 6}
VERSIONS = {"text": "minilm-l6-v2@1", "vggish": "vggish@synthetic"}


def _synthetic(n_users: int = 40, n_items: int = 30, seed: int = 0) -> InteractionData:
    """Two taste clusters; content of an item encodes its cluster plus noise."""
    rng = np.random.default_rng(seed)
    cluster = np.arange(n_items) % 2
    feats = {m: (rng.normal(size=(n_items, d)) + 2.0 * cluster[:, None] * np.eye(d)[0]).astype(np.float32)
             for m, d in DIMS.items()}
    rows = {0: [], 1: [], 2: []}
    for u in range(n_users):
        items = rng.permutation(np.flatnonzero(cluster == u % 2))[:8]
        for k, i in enumerate(items):
            rows[0 if k < 6 else 1 + (k - 6)].append((u, i))
    split = {k: np.asarray(v, dtype=np.int64) for k, v in rows.items()}
    return InteractionData("synthetic", n_users, n_items, split[0], split[1], split[2], feats, dict(VERSIONS),
                           "synthetic")


@pytest.fixture(scope="module", params=[1, 2], ids=["one-net", "ensemble-of-2"])
def trained(request, tmp_path_factory):
    """(data, net as evaluated, checkpoint path, known items) for a single net and a 2-member ensemble."""
    torch.set_num_threads(1)
    data = _synthetic()
    cfg = TrainConfig(block_dim=8, hidden=16, epochs=3, patience=3, batch_users=16)
    variant = get_variant("full")
    cold = np.array([0, 1])  # cold items: every train row removed, as in the cold-item protocol
    data.train, data.held_out = data.train[~np.isin(data.train[:, 1], cold)], cold
    known = np.unique(data.train[:, 1])
    results = [train(data, variant, cfg, seed=s, progress=False) for s in range(request.param)]
    net = results[0].net if request.param == 1 else EnsembleNet([r.net for r in results])
    path = save_checkpoint(export_payload(net, data, "full", variant, cfg, 0, {}), tmp_path_factory.mktemp("ckpt"))
    return data, net, path, known


def _items(data, ids):
    return [{m: data.features[m][i] for m in DIMS} for i in ids]


def test_loads_through_registry_and_matches_evaluated_vectors(trained):
    data, net, path, _ = trained
    model = get_fusion_model("trained", {**DIMS, "image": 1280}, checkpoint=str(path), encoder_versions=VERSIONS)
    assert model.version.startswith("trained@") and model.version.split("@")[1] in path.name
    ids = list(range(data.n_items))
    served = model.item_vectors(_items(data, ids), [str(i) for i in ids])
    with torch.no_grad():
        evaluated, _ = net.item_vectors(train=False)
    np.testing.assert_allclose(served, evaluated.numpy(), rtol=1e-4, atol=1e-5)
    # The online user vector ranks items exactly like the evaluated one.
    hist = data.user_items("train")[0]
    user = model.user_vector(served[hist], {})
    ids_t, mask = pad_histories([hist])
    with torch.no_grad():
        ref = net.scores(torch.tensor([0]), ids_t, mask, evaluated)[0].numpy()
    np.testing.assert_allclose(served @ user * np.linalg.norm(ref) / np.linalg.norm(served @ user), ref,
                               rtol=1e-3, atol=1e-4)


def test_contributions_sum_to_score(trained):
    data, _, path, _ = trained
    model = get_fusion_model("trained", DIMS, checkpoint=str(path))
    items = model.item_vectors(_items(data, range(10)), [str(i) for i in range(10)])
    user = model.user_vector(items[:4], {"text": data.features["text"][5]})
    parts = model.contributions(user, items)
    assert set(parts) == {"text", "vggish", "id"}
    np.testing.assert_allclose(sum(parts.values()), items @ user, rtol=1e-5, atol=1e-5)


def test_unknown_ids_borrow_from_their_content_neighbours(trained):
    data, _, path, known = trained
    model = get_fusion_model("trained", DIMS, checkpoint=str(path))
    cold = [i for i in range(data.n_items) if i not in set(known.tolist())]
    content = _items(data, cold)
    by_unknown_id = model.item_vectors(content, ["never-seen"] * len(cold))
    np.testing.assert_allclose(by_unknown_id, model.item_vectors(content, None))
    np.testing.assert_allclose(np.linalg.norm(by_unknown_id, axis=1), 1.0, rtol=1e-5)
    # No id of their own, but behaviour borrowed from the known items nearest by text.
    for block in model._blocks("id"):  # one per member
        assert (np.abs(by_unknown_id[:, block]).sum(1) > 1e-3).all()
    # Without text (the neighbour modality) there is nothing to match on: content blocks only.
    audio_only = model.item_vectors([{"vggish": data.features["vggish"][cold[0]]}], ["x"])
    assert np.isfinite(audio_only).all()
    for block in model._blocks("id"):
        np.testing.assert_allclose(audio_only[:, block], 0.0)
    with pytest.raises(ValueError, match="none of the modalities"):
        model.item_vectors([{}], ["x"])


def test_items_held_out_of_training_do_not_shape_the_model():
    """Held-out items are no negatives, no alignment sample and no mean: changing their content changes no
    warm vector. (Catalog items without interactions are negatives: that is what the second half checks.)"""
    torch.set_num_threads(1)
    cfg = TrainConfig(block_dim=8, hidden=16, epochs=2, patience=2, batch_users=16)
    vectors = []
    for scale in (1.0, -3.0):
        data = _synthetic()
        cold = np.array([0, 1])
        data.held_out = cold
        for part in ("train", "valid", "test"):  # valid too: epoch selection must not see them either
            setattr(data, part, getattr(data, part)[~np.isin(getattr(data, part)[:, 1], cold)])
        for m in DIMS:
            data.features[m][cold] *= scale
        net = train(data, get_variant("full"), cfg, seed=0, progress=False).net
        with torch.no_grad():
            vectors.append(net.item_vectors(train=False)[0][2:].numpy())
    np.testing.assert_array_equal(vectors[0], vectors[1])
    data.held_out = None  # the same items, now in the catalog with no interactions: they shape it
    net = train(data, get_variant("full"), cfg, seed=0, progress=False).net
    with torch.no_grad():
        unchosen = net.item_vectors(train=False)[0][2:].numpy()
    assert np.abs(unchosen - vectors[1]).max() > 1e-4


def test_mismatched_encoder_refuses(trained):
    _, _, path, _ = trained
    with pytest.raises(ValueError, match=r"text vectors of dim 12.*server provides dim 384"):
        get_fusion_model("trained", {"text": 384, "vggish": 6}, checkpoint=str(path))
    with pytest.raises(ValueError, match=r"vggish encoder 'vggish@synthetic'.*'vggish@other'"):
        get_fusion_model("trained", DIMS, checkpoint=str(path), encoder_versions={"vggish": "vggish@other"})


@pytest.mark.parametrize("trained", [2], indirect=True, ids=["ensemble-of-2"])
def test_ensemble_scores_the_mean_of_its_members(trained):
    data, net, path, _ = trained
    model = get_fusion_model("trained", DIMS, checkpoint=str(path))
    assert model.members == 2 and model.dim == 2 * net.member_dim
    ids = list(range(data.n_items))
    items = model.item_vectors(_items(data, ids), [str(i) for i in ids])
    np.testing.assert_allclose(np.linalg.norm(items, axis=1), 1.0, rtol=1e-5)
    hist_t, mask = pad_histories([data.user_items("train")[3]])
    with torch.no_grad():
        members = [m.scores(torch.tensor([3]), hist_t, mask) for m in net.members]
        np.testing.assert_allclose(net.scores(torch.tensor([3]), hist_t, mask), sum(members) / 2, rtol=1e-5)
    # Served: one inner product = the mean of the members' cosines = their mean score * temperature.
    user = model.user_vector(items[data.user_items("train")[3]], {})
    np.testing.assert_allclose(items @ user, (sum(members) / 2)[0].numpy() * net.cfg.temperature, rtol=1e-3,
                               atol=1e-4)


def test_ensemble_refuses_raw_inner_product_members():
    data = _synthetic()
    cfg = TrainConfig(block_dim=8, hidden=16, epochs=1, patience=1, batch_users=16, normalize=False)
    net = train(data, get_variant("full"), cfg, seed=0, progress=False).net
    with pytest.raises(ValueError, match="normalize=True"):
        EnsembleNet([net, net])


@pytest.mark.parametrize("trained", [1], indirect=True, ids=["one-net"])
def test_format_1_checkpoints_still_load(trained, tmp_path):
    """Checkpoints written before ensembles kept one net's weights at the top level (and had no
    cold-start neighbours: their unknown items stay content only)."""
    data, _, path, known = trained
    payload = torch.load(path, weights_only=True)
    member = payload.pop("members")[0]
    del member["cold_neighbours"], payload["cold_start"]
    payload.update(member, format_version=1)
    old = save_checkpoint(payload, tmp_path)
    ids = [str(i) for i in known]
    new_model, old_model = (get_fusion_model("trained", DIMS, checkpoint=str(p)) for p in (path, old))
    np.testing.assert_array_equal(old_model.item_vectors(_items(data, known), ids),
                                  new_model.item_vectors(_items(data, known), ids))
    unknown = old_model.item_vectors(_items(data, [0]), ["0"])
    np.testing.assert_allclose(unknown[:, old_model._blocks("id")[0]], 0.0)


@pytest.mark.parametrize("trained", [1], indirect=True, ids=["one-net"])
def test_a_replica_serves_a_checkpoint_without_the_training_stack(trained):
    """What a replica loads (registry -> TrainedFusion -> checkpoint, towers, cold) never imports fusion.train."""
    _, _, path, _ = trained
    code = f"""
import sys
import numpy as np
from fusionrec.fusion.registry import get_fusion_model
model = get_fusion_model("trained", {DIMS!r}, checkpoint={str(path)!r}, encoder_versions={VERSIONS!r})
items = model.item_vectors([{{m: np.ones(d, np.float32) for m, d in {DIMS!r}.items()}}], ["5"])
model.user_vector(items, {{}})
print(sorted(m for m in sys.modules if m.split(".")[:3] == ["fusionrec", "fusion", "train"]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"serving imported the training stack: {out.stdout}"


def test_unknown_net_kind_fails_listing_the_known_ones():
    from fusionrec.fusion.train.config import VariantConfig
    from fusionrec.fusion.train.nets import build_net

    with pytest.raises(ValueError, match=r"unknown net kind 'gru4rec'; known: \['fusion', 'lightgcn'\]"):
        build_net(VariantConfig(kind="gru4rec"), _synthetic(), TrainConfig())

