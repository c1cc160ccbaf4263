from __future__ import annotations

import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from atelier.schema import ItemJSON, load_schema
from atelier.vocab import (
    CLS_ID,
    MASK_ID,
    PAD_ID,
    RE_RESERVED,
    UNK_ID,
    Vocab,
    VocabError,
    build_vocab,
    re_bucket,
    tensorise,
)


@pytest.fixture(scope="module")
def vocab() -> Vocab:
    return build_vocab(load_schema())


def test_specials_and_round_trip(vocab: Vocab) -> None:
    assert (PAD_ID, MASK_ID, UNK_ID, CLS_ID) == (0, 1, 2, 3)
    schema = load_schema()
    for name, spec in schema.std.items():
        for value in spec.values:
            idx = vocab.std_id(name, value)
            assert vocab.std_token(idx) == (name, value)
    ids = [vocab.std_id(n, v) for n, s in schema.std.items() for v in s.values]
    assert len(set(ids)) == len(ids)  # one shared table, no collisions across fields


def test_unknown_values_get_per_field_unknown(vocab: Vocab) -> None:
    a = vocab.std_id("color", "ultraviolet")
    b = vocab.std_id("season", "monsoon")
    assert a == vocab.field_unk_id("color") and b == vocab.field_unk_id("season") and a != b
    assert vocab.std_id("no_such_field", "x") == UNK_ID
    assert vocab.field_id("no_such_field") == UNK_ID
    assert vocab.std_id("color", " Black ") == vocab.std_id("color", "black")


def test_re_hash_is_crc32_of_field_and_value(vocab: Vocab) -> None:
    expected = RE_RESERVED + zlib.crc32(b"style=gorpcore") % vocab.re_buckets
    assert vocab.re_id("style", "  Gorpcore") == expected
    assert vocab.re_id("style", "gorpcore") != vocab.re_id("vibe", "gorpcore")


@given(st.text(max_size=30), st.text(max_size=30), st.integers(min_value=1, max_value=1 << 20))
def test_re_hash_in_range_and_deterministic(name: str, value: str, buckets: int) -> None:
    a = re_bucket(name, value, buckets)
    assert a == re_bucket(name, value, buckets)
    assert RE_RESERVED <= a < RE_RESERVED + buckets


def test_re_hash_stable_across_processes() -> None:
    words = ["gorpcore", "quiet luxury", "coquette", "Beach wedding guest", "ümlaut"]
    code = (
        "import sys; from atelier.vocab import re_bucket;"
        f"print([re_bucket('style', w) for w in {words!r}])"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    assert outs.pop().strip() == str([re_bucket("style", w) for w in words])


def test_save_load_round_trip(vocab: Vocab, tmp_path: Path) -> None:
    path = tmp_path / "vocab.json"
    vocab.save(path)
    again = Vocab.load(path)
    assert again.version == vocab.version and again.std_tokens == vocab.std_tokens
    path.write_text(path.read_text().replace('"re_buckets": 32768', '"re_buckets": 16'))
    with pytest.raises(VocabError, match="does not match its version"):
        Vocab.load(path)
    with pytest.raises(VocabError, match="run `atelier vocab` first"):
        Vocab.load(tmp_path / "none.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(VocabError, match=r"junk\.json"):
        Vocab.load(tmp_path / "junk.json")


def test_counts_record_data(vocab: Vocab) -> None:
    items = [ItemJSON(item_id="1", clothes={"color": ["black"]}), ItemJSON(item_id="2", clothes={"color": ["black"]})]
    counted = build_vocab(load_schema(), items)
    assert counted.counts == {"color=black": 2}
    assert counted.version == vocab.version  # counts do not change ids


def test_tensorise_shapes_parents_and_padding(vocab: Vocab) -> None:
    items = [
        ItemJSON(item_id="a", clothes={"category_specification": ["outer"], "color": ["beige"]},
                 reinforced_feature_value={"category_specification": ["trench coat"], "style": ["gorpcore"]}),
        ItemJSON(item_id="b", clothes={"color": ["black"]}),
    ]
    tok = tensorise(items, vocab)
    assert tok.std_ids.shape == (2, 2) and tok.re_ids.shape == (2, 2)
    assert tok.std_ids[0, 0] == vocab.std_id("category_specification", "outer")
    assert tok.std_field_ids[0, 1] == vocab.field_id("color")
    # RE 'trench coat' hangs off the item's own category_specification value ...
    assert tok.re_parent_ids[0, 0] == vocab.std_id("category_specification", "outer")
    # ... and 'style' has no STD value on this item, so its parent is style's unknown id.
    assert tok.re_parent_ids[0, 1] == vocab.field_unk_id("style")
    assert tok.re_ids[0, 0] == vocab.re_id("category_specification", "trench coat")
    assert tok.std_mask.tolist() == [[True, True], [True, False]]
    assert tok.re_mask.tolist() == [[True, True], [False, False]]
    assert tok.std_ids.dtype == torch.long and len(tok) == 2


def test_tensorise_truncates(vocab: Vocab) -> None:
    item = ItemJSON(item_id="a", reinforced_feature_value={"style": [f"w{i}" for i in range(8)]})
    tok = tensorise([item], vocab, max_re=3)
    assert tok.re_ids.shape == (1, 3) and tok.re_mask.all()
    empty = tensorise([ItemJSON(item_id="e")], vocab)
    assert empty.std_ids.shape == (1, 1) and not empty.std_mask.any()
