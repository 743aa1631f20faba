"""The planted generator's answer key is right, and what it writes is what every stage reads."""

import numpy as np
import pytest
import torch

from diffkit.activations import ActivationStore
from diffkit.errors import DiffkitError
from diffkit.synthetic import PLANTED_HOOK, PlantedConfig, make_planted, write_planted_saes, write_planted_store


@pytest.mark.parametrize("d_a,d_b,scale_b", [(32, 32, 1.0), (24, 40, 3.0), (40, 24, 0.5)])
def test_shared_part_of_b_is_shared_part_of_a_through_the_map(d_a, d_b, scale_b):
    pair = make_planted(PlantedConfig(d_a=d_a, d_b=d_b, n_shared=64, n_a_only=8, n_b_only=12, k=3,
                                      n_tokens=2000, scale_b=scale_b, seed=3))
    shared_a = pair.codes_a[:, pair.shared_a] @ pair.dict_a[pair.shared_a]
    shared_b = pair.codes_b[:, pair.shared_b] @ pair.dict_b[pair.shared_b]
    np.testing.assert_allclose(shared_a @ pair.map_ab, shared_b, atol=1e-4 * scale_b)
    # Shared features fire on the same tokens in both models; exclusives in one only.
    np.testing.assert_array_equal(pair.codes_a[:, pair.shared_a] > 0, pair.codes_b[:, pair.shared_b] > 0)
    assert sorted(np.concatenate([pair.shared_a, pair.a_only])) == list(range(72))
    assert sorted(np.concatenate([pair.shared_b, pair.b_only])) == list(range(76))
    assert (pair.match_a_to_b[pair.a_only] == -1).all() and (pair.match_b_to_a[pair.match_a_to_b[pair.shared_a]]
                                                            == pair.shared_a).all()
    np.testing.assert_allclose(np.linalg.norm(pair.dict_b, axis=1), 1.0, atol=1e-5)
    assert abs((pair.codes_a > 0).sum(1).mean() - 3) < 0.3
    # The dictionaries are shuffled: the answer is not the identity.
    assert (pair.shared_a != pair.shared_b).mean() > 0.9


def test_same_seed_same_pair_other_seed_other_pair():
    a, b = make_planted(PlantedConfig(n_tokens=500)), make_planted(PlantedConfig(n_tokens=500))
    c = make_planted(PlantedConfig(n_tokens=500, seed=1))
    np.testing.assert_array_equal(a.acts_b, b.acts_b)
    assert not np.array_equal(a.shared_b, c.shared_b)


def test_written_store_holds_the_planted_rows(tmp_path):
    pair = make_planted(PlantedConfig(d_a=16, d_b=24, n_shared=32, n_a_only=4, n_b_only=4, k=2, n_tokens=5000,
                                      ctx=50, seed=1))
    write_planted_store(pair, tmp_path / "store", seqs_per_shard=16)
    store = ActivationStore.open(tmp_path / "store", verify="full")
    assert store.n_tokens("all") == 5000 and store.n_shards == 7
    assert store.n_tokens("heldout") == 10 * 50  # sequences 9, 19, ..., 99
    assert (store.d_model("a"), store.d_model("b"), store.hook("b")) == (16, 24, PLANTED_HOOK)
    rows_a = []
    for shard in store.manifest["shards"]:
        pos = np.load(tmp_path / "store" / f"tokens/shard_{shard['index']:05d}.pos.npy")
        rows_a.append(shard["seq_start"] * 50 + pos)
    token_index = np.concatenate(rows_a)
    a, b = zip(*store.iter_shards("all", normalized=False))
    np.testing.assert_array_equal(torch.cat(a).numpy(), pair.acts_a[token_index])
    np.testing.assert_array_equal(torch.cat(b).numpy(), pair.acts_b[token_index])
    with pytest.raises(DiffkitError, match="not empty"):
        write_planted_store(pair, tmp_path / "store")


def test_planted_saes_load_through_sae_lens(tmp_path):
    from sae_lens import SAE

    pair = make_planted(PlantedConfig(n_tokens=4000))
    write_planted_saes(pair, tmp_path / "sae_a", tmp_path / "sae_b")
    sae_a, sae_b = SAE.load_from_disk(str(tmp_path / "sae_a")), SAE.load_from_disk(str(tmp_path / "sae_b"))
    np.testing.assert_allclose(sae_b.W_dec.detach().numpy(), pair.dict_b, atol=1e-6)
    assert sae_a.cfg.metadata.hook_name == PLANTED_HOOK
    acts = torch.from_numpy(pair.acts_a)
    with torch.no_grad():
        feats = sae_a.encode(acts)
        recon = sae_a.decode(feats)
    fvu = ((recon - acts) ** 2).sum() / ((acts - acts.mean(0)) ** 2).sum()
    assert fvu < 0.4
    # Most of what the SAE says fires does fire in the planted codes.
    assert ((feats.numpy() > 0) & (pair.codes_a > 0)).sum() / (feats.numpy() > 0).sum() > 0.6


def test_changed_strength_is_planted_exactly():
    """Changed features: same tokens, same direction through the map, coefficient × change_factor in B; A untouched."""
    from diffkit.synthetic import planted_config

    cfg = PlantedConfig(d_a=24, d_b=40, n_shared=64, n_a_only=8, n_b_only=8, n_changed=10, change_factor=3.0,
                        k=3, n_tokens=3000, scale_b=2.0, seed=5)
    pair = make_planted(cfg)
    base = make_planted(PlantedConfig(**{**cfg.__dict__, "n_changed": 0}))
    assert len(pair.changed_a) == len(pair.changed_b) == 10
    assert set(pair.changed_a) <= set(pair.shared_a) and (pair.match_a_to_b[pair.changed_a] == pair.changed_b).all()
    np.testing.assert_array_equal(pair.acts_a, base.acts_a)  # A is the same model
    np.testing.assert_array_equal(pair.dict_b, base.dict_b)  # same directions, same answer key
    gain = np.ones(len(pair.dict_b))
    gain[pair.changed_b] = 3.0
    np.testing.assert_allclose(pair.codes_b, base.codes_b * gain[None, :].astype(np.float32), rtol=1e-6)
    for ia, ib in zip(pair.shared_a, pair.shared_b):
        expected = (3.0 if ia in set(pair.changed_a) else 1.0) * np.outer(pair.codes_a[:, ia], pair.dict_a[ia] @ pair.map_ab)
        np.testing.assert_allclose(np.outer(pair.codes_b[:, ib], pair.dict_b[ib]), expected, atol=1e-4)
    # The default (no changed features) gives exactly the pair the generator gave before the option existed.
    np.testing.assert_array_equal(make_planted(PlantedConfig(n_tokens=500, change_factor=5.0)).acts_b,
                                  make_planted(PlantedConfig(n_tokens=500)).acts_b)
    # Superposition as a knob.
    sup = planted_config(d=32, superposition=4.0, frac_exclusive=0.25, frac_changed=0.5, n_tokens=500)
    assert sup.superposition == (4.0, 4.0) and (sup.n_shared, sup.n_a_only, sup.n_changed) == (96, 32, 48)
    with pytest.raises(DiffkitError, match="n_changed"):
        PlantedConfig(n_shared=4, n_changed=5)
    with pytest.raises(DiffkitError, match="change_factor"):
        PlantedConfig(change_factor=0.0)
