"""Dual vocabulary (DESIGN.md section 3) and item tensorisation for the item tower.

- STD: one shared lookup table over all fields (``field=value`` -> id) built from the schema,
  with special ids (pad, mask, unknown, cls) and one unknown id per field, saved with a version.
- RE: stateless hashing, ``zlib.crc32(f"{field}={value}")`` into a fixed number of buckets: a
  new trend word gets an id the moment it appears, the same on every machine, with no table.
- Fields: one id per field name (STD and RE fields share ids when they share a name).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from atelier.atomic import write_json
from atelier.schema import ItemJSON, Schema, normalise_text

PAD, MASK, UNK, CLS = "[PAD]", "[MASK]", "[UNK]", "[CLS]"
SPECIALS = (PAD, MASK, UNK, CLS)  # ids 0..3 in both the STD table and the field table
PAD_ID, MASK_ID, UNK_ID, CLS_ID = range(4)
RE_RESERVED = 2  # RE ids 0 (pad) and 1 (mask) are never hash outputs
DEFAULT_RE_BUCKETS = 1 << 15  # ~33k: few collisions for the few thousand distinct RE phrases
VOCAB_FORMAT = 1


class VocabError(ValueError):
    """A vocabulary file is missing, malformed or of another format."""


def re_bucket(field_name: str, value: str, num_buckets: int = DEFAULT_RE_BUCKETS) -> int:
    """The RE id of ``field=value``: crc32 of the normalised text into ``num_buckets`` buckets."""
    key = f"{field_name}={normalise_text(value)}".encode()
    return RE_RESERVED + zlib.crc32(key) % num_buckets


@dataclass
class Vocab:
    """STD lookup table, field ids and the RE hashing setup, as one persisted object."""

    std_tokens: list[str]
    field_names: list[str]
    re_parents: dict[str, str]
    re_buckets: int = DEFAULT_RE_BUCKETS
    schema_version: str = ""
    counts: dict[str, int] = field(default_factory=dict)
    _std_index: dict[str, int] = field(init=False, repr=False)
    _field_index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._std_index = {tok: i for i, tok in enumerate(self.std_tokens)}
        self._field_index = {name: i for i, name in enumerate(self.field_names)}

    # ---- sizes and ids
    @property
    def std_size(self) -> int:
        """Rows of the STD embedding table."""
        return len(self.std_tokens)

    @property
    def re_size(self) -> int:
        """Rows of the RE embedding table (buckets + reserved ids)."""
        return self.re_buckets + RE_RESERVED

    @property
    def field_size(self) -> int:
        """Rows of the field embedding table."""
        return len(self.field_names)

    @property
    def version(self) -> str:
        """Content hash: two vocabularies with the same version give the same ids."""
        payload = json.dumps([self.std_tokens, self.field_names, self.re_parents, self.re_buckets])
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    def field_id(self, name: str) -> int:
        """Id of a field name; UNK_ID for a field the vocabulary does not know."""
        return self._field_index.get(name, UNK_ID)

    def field_unk_id(self, name: str) -> int:
        """The per-field unknown STD id (global UNK_ID for an unknown field)."""
        return self._std_index.get(f"{name}={UNK}", UNK_ID)

    def std_id(self, name: str, value: str) -> int:
        """Id of an STD value; the field's unknown id when the value is not in the vocabulary."""
        idx = self._std_index.get(f"{name}={value}")
        if idx is None:
            idx = self._std_index.get(f"{name}={normalise_text(value)}")
        return idx if idx is not None else self.field_unk_id(name)

    def std_token(self, idx: int) -> tuple[str, str]:
        """(field, value) of an STD id; specials come back as ("", token)."""
        token = self.std_tokens[idx]
        if token in SPECIALS:
            return "", token
        name, _, value = token.partition("=")
        return name, value

    def re_id(self, name: str, value: str) -> int:
        """RE id of a free-text value (stateless hashing)."""
        return re_bucket(name, value, self.re_buckets)

    # ---- persistence
    def to_dict(self) -> dict[str, object]:
        """A plain dict (goes into checkpoints and vocab.json)."""
        return {
            "format": VOCAB_FORMAT, "version": self.version, "schema_version": self.schema_version,
            "std_tokens": self.std_tokens, "field_names": self.field_names, "re_parents": self.re_parents,
            "re_buckets": self.re_buckets, "counts": self.counts,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> Vocab:
        """Rebuild from ``to_dict`` output, checking format and version."""
        if data.get("format") != VOCAB_FORMAT:
            raise VocabError(f"vocabulary format {data.get('format')!r}, expected {VOCAB_FORMAT}")
        try:
            vocab = cls(
                std_tokens=list(data["std_tokens"]),  # type: ignore[call-overload]
                field_names=list(data["field_names"]),  # type: ignore[call-overload]
                re_parents=dict(data["re_parents"]),  # type: ignore[call-overload]
                re_buckets=int(data["re_buckets"]),  # type: ignore[call-overload]
                schema_version=str(data.get("schema_version", "")),
                counts=dict(data.get("counts", {})),  # type: ignore[call-overload]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise VocabError(f"malformed vocabulary: {exc}") from None
        if data.get("version") not in (None, vocab.version):
            raise VocabError(f"vocabulary content does not match its version {data.get('version')}")
        return vocab

    def save(self, path: Path) -> None:
        """Write vocab.json atomically (temp file + rename)."""
        write_json(path, self.to_dict(), indent=1, ensure_ascii=False)

    @classmethod
    def load(cls, path: Path) -> Vocab:
        """Read vocab.json (VocabError with the path when missing or malformed)."""
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise VocabError(f"{path}: no vocabulary; run `atelier vocab` first") from None
        except (json.JSONDecodeError, VocabError) as exc:
            raise VocabError(f"{path}: {exc}") from None


def build_vocab(
    schema: Schema,
    items: Iterable[ItemJSON] = (),
    re_buckets: int = DEFAULT_RE_BUCKETS,
) -> Vocab:
    """The vocabulary of a schema; ``items`` (optional) are counted so the file shows what data used."""
    std_tokens = list(SPECIALS)
    for name, spec in schema.std.items():
        std_tokens.append(f"{name}={UNK}")
        std_tokens.extend(f"{name}={value}" for value in spec.values)
    field_names = [*SPECIALS, *schema.field_names, "title", "description"]
    re_parents = {name: spec.parent for name, spec in schema.re.items()}
    vocab = Vocab(std_tokens, field_names, re_parents, re_buckets, schema.version)
    counts: Counter[str] = Counter()
    for item in items:
        for name, values in item.clothes.items():
            for value in values:
                counts[vocab.std_tokens[vocab.std_id(name, value)]] += 1
    vocab.counts = dict(sorted(counts.items()))
    return vocab


# --------------------------------------------------------------------------- tensorisation


@dataclass
class ItemTokens:
    """Token tensors of a batch of items, padded; masks are True on real tokens."""

    std_ids: torch.Tensor  # (batch, n_std) long
    std_field_ids: torch.Tensor  # (batch, n_std) long
    std_mask: torch.Tensor  # (batch, n_std) bool
    re_ids: torch.Tensor  # (batch, n_re) long
    re_parent_ids: torch.Tensor  # (batch, n_re) long: STD id of the same item's parent-field value
    re_field_ids: torch.Tensor  # (batch, n_re) long
    re_mask: torch.Tensor  # (batch, n_re) bool

    def __len__(self) -> int:
        return int(self.std_ids.shape[0])


def item_token_lists(item: ItemJSON, vocab: Vocab) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
    """(std id, field id) pairs and (re id, parent std id, field id) triples of one item."""
    std: list[tuple[int, int]] = []
    first_value: dict[str, int] = {}
    for name, values in item.clothes.items():
        fid = vocab.field_id(name)
        for value in values:
            sid = vocab.std_id(name, value)
            std.append((sid, fid))
            first_value.setdefault(name, sid)
    re_tokens: list[tuple[int, int, int]] = []
    for name, values in item.reinforced_feature_value.items():
        parent = vocab.re_parents.get(name, name)
        parent_id = first_value.get(parent, vocab.field_unk_id(parent))
        fid = vocab.field_id(name)
        re_tokens.extend((vocab.re_id(name, value), parent_id, fid) for value in values)
    return std, re_tokens


def tensorise(items: Sequence[ItemJSON], vocab: Vocab, max_std: int = 32, max_re: int = 48) -> ItemTokens:
    """Pad a batch of items into the tensors the item tower reads (extra tokens are cut, in order)."""
    assert items, "tensorise needs at least one item"
    lists = [item_token_lists(item, vocab) for item in items]
    n_std = max(1, min(max_std, max(len(s) for s, _ in lists)))
    n_re = max(1, min(max_re, max(len(r) for _, r in lists)))
    batch = len(items)
    std = torch.zeros(batch, n_std, 2, dtype=torch.long)  # (batch, n_std, [id, field])
    re_t = torch.zeros(batch, n_re, 3, dtype=torch.long)  # (batch, n_re, [id, parent, field])
    for row, (s, r) in enumerate(lists):
        if s:
            std[row, : min(len(s), n_std)] = torch.tensor(s[:n_std], dtype=torch.long)
        if r:
            re_t[row, : min(len(r), n_re)] = torch.tensor(r[:n_re], dtype=torch.long)
    return ItemTokens(
        std_ids=std[..., 0], std_field_ids=std[..., 1], std_mask=std[..., 0] != PAD_ID,
        re_ids=re_t[..., 0], re_parent_ids=re_t[..., 1], re_field_ids=re_t[..., 2],
        re_mask=re_t[..., 0] != PAD_ID,
    )
