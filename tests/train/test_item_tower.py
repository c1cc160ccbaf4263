from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from atelier.models.item_tower import (
    CheckpointError,
    ItemInputs,
    ItemTower,
    ItemTowerConfig,
    encode_items,
    item_inputs,
    load_checkpoint,
    save_checkpoint,
)
from atelier.models.losses import info_nce
from atelier.models.views import ViewConfig, complementary_masks, make_views
from atelier.recommender import TrainData
from atelier.schema import ItemJSON, load_schema
from atelier.train.item import (
    BehaviourConfig,
    TrainItemConfig,
    behaviour_finetune,
    behaviour_pairs,
    lr_at,
    train_item_tower,
)
from atelier.vocab import Vocab, build_vocab


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return build_vocab(load_schema())


def _items() -> list[ItemJSON]:
    colours = ["black", "white", "red", "navy", "beige", "pink", "green", "gray"]
    kinds = [("02top_06tshirt", "top"), ("03bottom_02pants", "bottom"), ("04onepiece_01dress", "onepiece"),
             ("01outer_01coat", "outer")]
    return [
        ItemJSON(item_id=f"i{i}",
                 clothes={"category": [kinds[i % 4][0]], "category_specification": [kinds[i % 4][1]],
                          "color": [colours[i % 8]], "gender": ["female" if i % 3 else "male"]},
                 reinforced_feature_value={"style": [f"style word {i % 5}"], "fit": ["relaxed" if i % 2 else "boxy"]})
        for i in range(64)
    ]


def _config(vocab: Vocab, **kw: object) -> ItemTowerConfig:
    return ItemTowerConfig(vocab.std_size, vocab.re_size, vocab.field_size, n_text=1, d_model=32, n_layers=1,
                           n_heads=2, out_dim=16, title_field_id=vocab.field_id("title"),
                           description_field_id=vocab.field_id("description"), **kw)  # type: ignore[arg-type]


def _inputs(vocab: Vocab) -> ItemInputs:
    gen = torch.Generator().manual_seed(0)
    return item_inputs(_items(), vocab, torch.randn(64, 384, generator=gen))


def test_shapes_and_unit_norm(vocab: Vocab) -> None:
    torch.manual_seed(0)
    model = ItemTower(_config(vocab)).eval()
    x = _inputs(vocab)
    z = model(x)
    assert z.shape == (64, 16)
    assert torch.allclose(z.norm(dim=-1), torch.ones(64), atol=1e-5)
    # An item with no tokens and no text still gets a finite vector (the [CLS] token is always there).
    empty = item_inputs([ItemJSON(item_id="e")], vocab, torch.zeros(1, 384))
    assert not empty.text_mask.any() and torch.isfinite(model(empty)).all()


def test_stop_gradient_keeps_re_out_of_std_table(vocab: Vocab) -> None:
    model = ItemTower(_config(vocab))
    items = [ItemJSON(item_id="a", reinforced_feature_value={"style": ["gorpcore"]})]
    x = item_inputs(items, vocab, torch.zeros(1, 384))  # no STD tokens, no text: only the RE token
    parent = int(x.tokens.re_parent_ids[0, 0])
    model(x).sum().backward()
    assert model.emb_std.weight.grad is None or model.emb_std.weight.grad[parent].abs().sum() == 0
    assert model.emb_re.weight.grad[int(x.tokens.re_ids[0, 0])].abs().sum() > 0


def test_views_are_complementary(vocab: Vocab) -> None:
    real = torch.rand(200, 12) < 0.7
    a, b = complementary_masks(real, 0.8, share=0.0, generator=torch.Generator().manual_seed(0))
    assert not (a & b).any() and torch.equal(a | b, real)
    a, b = complementary_masks(real, 0.8, share=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a | b, real) and (a & b).any()
    x = _inputs(vocab)
    va, vb = make_views(x, ViewConfig(feature_dropout=0.0), torch.Generator().manual_seed(0))
    # A is STD-heavy, B is RE-heavy.
    assert va.tokens.std_mask.sum() > vb.tokens.std_mask.sum()
    assert vb.tokens.re_mask.sum() > va.tokens.re_mask.sum()
    assert torch.equal(va.tokens.std_mask | vb.tokens.std_mask, x.tokens.std_mask)


def test_length_groups_encode_exactly_as_one_padded_batch(vocab: Vocab) -> None:
    torch.manual_seed(0)
    model = ItemTower(_config(vocab)).eval()
    # a view masks tokens mid-row, so rows keep different numbers of tokens in different places
    va, _ = make_views(_inputs(vocab), ViewConfig(p_std=0.5), torch.Generator().manual_seed(3))
    with torch.inference_mode():
        tokens, pad = model.embed(va)
        assert len(set((~pad).sum(1).tolist())) > 1  # the groups differ in length
        assert torch.allclose(model.encode_cls(tokens, pad), model.encoder(tokens, src_key_padding_mask=pad)[:, 0],
                              atol=1e-5)


PINNED = [-0.1509894, 0.5536135, 0.0453959, -0.1971134]


def test_fixed_seed_regression(vocab: Vocab) -> None:
    torch.manual_seed(1234)
    model = ItemTower(_config(vocab)).eval()
    z = model(_inputs(vocab))
    torch.manual_seed(1234)
    again = ItemTower(_config(vocab)).eval()(_inputs(vocab))
    assert torch.equal(z, again)
    # Pinned values: they change only when the architecture, its initialisation or tensorisation does.
    assert z[0, :4].tolist() == pytest.approx(PINNED, abs=1e-4)


def test_info_nce_prefers_matching_rows() -> None:
    a = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    assert info_nce(a, a) < info_nce(a, a.roll(1, 0))
    with pytest.raises(AssertionError):
        info_nce(a, a[:4])


def test_overfits_one_tiny_batch(vocab: Vocab) -> None:
    x = _inputs(vocab)
    _, history = train_item_tower(x, _config(vocab, dropout=0.0),
                                      TrainItemConfig(epochs=30, batch_size=64, lr=3e-3, warmup_frac=0.1))
    losses = [e["loss"] for e in history["epochs"]]
    assert losses[-1] < 0.6 * losses[0], losses


def test_lr_schedule() -> None:
    assert lr_at(0, 100, 10) == pytest.approx(0.1)
    assert lr_at(10, 100, 10) == pytest.approx(1.0)
    assert lr_at(100, 100, 10) == pytest.approx(0.0)


def test_checkpoint_round_trip(vocab: Vocab, tmp_path: Path) -> None:
    model = ItemTower(_config(vocab)).eval()
    x = _inputs(vocab)
    path = tmp_path / "tower.pt"
    save_checkpoint(model, path, vocab.to_dict(), {"history": {}})
    loaded, payload = load_checkpoint(path)
    assert payload["schema_version"] == vocab.schema_version
    assert (encode_items(model, x) == encode_items(loaded, x)).all()
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="run `atelier train item` first"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save({"kind": "something else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of the item tower"):
        load_checkpoint(tmp_path / "other.pt")


def _behaviour_data(tmp_path: Path) -> TrainData:
    """Eight items in four products (two colourways each); shopper u1 buys i0+i2 one day and i4 the next."""
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(8)], "group_id": [f"g{i // 2}" for i in range(8)]})
    log = pd.DataFrame({"user_id": ["u1", "u1", "u1", "u2"], "item_id": ["i0", "i2", "i4", "i6"],
                        "ts": pd.to_datetime(["2024-01-01", "2024-01-01", "2024-01-02", "2024-01-01"])})
    return TrainData("toy", items, log, pd.DataFrame({"user_id": ["u1", "u2"]}), tmp_path)


def test_behaviour_pairs_come_from_the_window_and_the_catalogue(tmp_path: Path) -> None:
    pairs, kinds = behaviour_pairs(_behaviour_data(tmp_path))
    got = {tuple(p) for p in pairs.tolist()}
    assert kinds == {"same_day": 2, "same_shopper": 6, "colourways": 8}
    assert {(0, 2), (2, 0), (0, 4), (4, 2)} <= got  # bought together, the same day and across days
    assert {(0, 1), (1, 0), (6, 7)} <= got  # colourways, sold or not
    assert not any(a == b for a, b in got) and (6, 0) not in got  # u2 bought alone: no pair with u1's items


def test_behaviour_tuning_pulls_pairs_together_from_content_alone(vocab: Vocab) -> None:
    x = _inputs(vocab)
    model, _ = train_item_tower(x, _config(vocab, dropout=0.0), TrainItemConfig(epochs=2, batch_size=64))
    pairs = torch.tensor([[i, (i + 5) % 64] for i in range(0, 64, 2)] * 4)  # items of unrelated content

    def partner_rank(vectors: object) -> float:
        """Mean rank of each pair's partner among the other 63 items, by cosine."""
        z = torch.as_tensor(vectors)
        sims = z[pairs[:32, 0]] @ z.T
        sims[torch.arange(32), pairs[:32, 0]] = -2.0
        return float((sims > sims[torch.arange(32), pairs[:32, 1]][:, None]).sum(1).float().mean())

    before = partner_rank(encode_items(model, x))
    tuned, history = behaviour_finetune(model, x, pairs, BehaviourConfig(epochs=8, batch_size=32, max_pairs=128,
                                                                         lr=3e-3, simcse_weight=0.0))
    after = partner_rank(encode_items(tuned, x))  # the same content inputs: no item id anywhere in the tower
    assert after < 3 < before, (before, after, history["epochs"])
