"""User towers by name: the sequence-aware GRU tower's contract, training and checkpoint round trip."""

import numpy as np
import pytest
import torch

from fusionrec.fusion.registry import get_fusion_model
from fusionrec.fusion.towers import USER_TOWERS, GRUUserTower, UserTower, build_user_tower
from fusionrec.fusion.train.config import TrainConfig, get_variant
from fusionrec.fusion.train.export import export_payload, save_checkpoint
from fusionrec.fusion.train.training import pad_histories, train
from test_trained_fusion import DIMS, VERSIONS, _items, _synthetic


def test_registry_builds_each_kind_and_fails_loudly_on_unknown_names():
    assert type(build_user_tower("attention", 8)) is UserTower
    assert type(build_user_tower("gru", 8)) is GRUUserTower
    with pytest.raises(ValueError, match=r"unknown user tower 'lstm'; known: \['attention', 'gru'\]"):
        build_user_tower("lstm", 8)
    assert sorted(USER_TOWERS) == ["attention", "gru"]


def test_gru_tower_shapes_order_and_padding():
    torch.manual_seed(0)
    tower = build_user_tower("gru", 16).eval()
    torch.nn.init.normal_(tower.seq_out.weight)  # as after training: the GRU term is live
    seqs = [torch.randn(n, 16) for n in (5, 2, 0)]
    batch = torch.zeros(3, 5, 16)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for r, s in enumerate(seqs):  # right-aligned, newest last, as training and serving pad
        if len(s):
            batch[r, -len(s):], mask[r, -len(s):] = s, True
    with torch.no_grad():
        out = tower(batch, mask, query=torch.randn(3, 16))
        alone = tower(seqs[1].unsqueeze(0), torch.ones(1, 2, dtype=torch.bool))
        no_query = tower(batch, mask)
        reordered = tower(seqs[0].flip(0).unsqueeze(0), torch.ones(1, 5, dtype=torch.bool))
        forward = tower(seqs[0].unsqueeze(0), torch.ones(1, 5, dtype=torch.bool))
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    # Padding never enters the GRU: a padded row equals the same history alone.
    torch.testing.assert_close(no_query[1:2], alone, rtol=1e-5, atol=1e-6)
    # An empty history without a query is the zero vector; order matters (the pooling part alone would not care
    # beyond recency, the GRU does).
    assert torch.count_nonzero(no_query[2]) == 0
    assert not torch.allclose(reordered, forward)


@pytest.fixture(scope="module")
def gru_run():
    torch.set_num_threads(1)
    data = _synthetic()
    cfg = TrainConfig(block_dim=8, hidden=16, epochs=6, patience=6, batch_users=16, user_tower="gru")
    return data, cfg, train(data, get_variant("full"), cfg, seed=0, progress=False)


def test_gru_tower_trains_and_its_loss_falls(gru_run):
    _, _, result = gru_run
    losses = [c["loss"] for c in result.curve]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    tower = result.net.user_tower
    assert isinstance(tower, GRUUserTower)
    # The sequence path received gradients: its output map left its zero init.
    assert float(tower.seq_out.weight.detach().abs().sum()) > 0


def test_gru_checkpoint_serves_what_was_evaluated_and_old_checkpoints_stay_attention(gru_run, tmp_path):
    data, cfg, result = gru_run
    net = result.net.eval()
    payload = export_payload(net, data, "full", get_variant("full"), cfg, 0, {})
    path = save_checkpoint(payload, tmp_path)
    model = get_fusion_model("trained", DIMS, checkpoint=str(path), encoder_versions=VERSIONS)
    assert model.user_tower == "gru"
    ids = list(range(data.n_items))
    served = model.item_vectors(_items(data, ids), [str(i) for i in ids])
    hist = data.user_items("train")[3]
    user = model.user_vector(served[hist], {})
    ids_t, mask = pad_histories([hist])
    with torch.no_grad():
        evaluated, _ = net.item_vectors(train=False)
        ref = net.scores(torch.tensor([3]), ids_t, mask, evaluated)[0].numpy()
    np.testing.assert_allclose(served @ user, ref / np.linalg.norm(ref) * np.linalg.norm(served @ user),
                               rtol=1e-3, atol=1e-4)
    # A checkpoint from before tower kinds (no "user_tower" key) loads as the attention tower it was.
    attention = train(data, get_variant("full"), TrainConfig(block_dim=8, hidden=16, epochs=1, batch_users=16),
                      seed=0, progress=False).net
    old = export_payload(attention, data, "full", get_variant("full"), attention.cfg, 0, {})
    del old["user_tower"]
    old_model = get_fusion_model("trained", DIMS, checkpoint=str(save_checkpoint(old, tmp_path)))
    assert old_model.user_tower == "attention"
    assert old_model.user_vector(served[hist][:, :old_model.dim], {}).shape == (old_model.dim,)


def test_chronological_splits_feed_a_prefix_and_predict_what_follows():
    from fusionrec.fusion.train.training import split_history

    rng = np.random.default_rng(0)
    items = np.arange(10, 20)
    for _ in range(50):
        given, target = split_history(items, 0.5, rng, prefix_share=1.0)
        assert len(given) >= 5 and len(target) >= 1
        np.testing.assert_array_equal(np.concatenate([given, target]), items)  # a cut in time, order kept
    # prefix_share=0 is the random split: some inputs are not a prefix.
    randoms = [split_history(items, 0.5, rng)[0] for _ in range(20)]
    assert any(not np.array_equal(g, items[:len(g)]) for g in randoms)
