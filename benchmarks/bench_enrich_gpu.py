"""Full-catalogue enrichment on one GPU: export here, score there, collect here (the shared GPU skeleton).

The GPU machine has torch, transformers and peft but not atelier's other needs, so every GPU job of the
project has the same three steps (``bench_loglik_gpu.py`` and ``bench_lora_gpu.py`` use the same loader
and scorer, ``atelier.enrich.gpu``):

1. **export** (here): ``python -m benchmarks.bench_enrich_gpu export --dataset hm --out .build/devcarry/enrich``
   builds, with llama.cpp's own tokenizer, every product's log-likelihood *tree* exactly as the CPU scorer
   asks it (``loglik.LogLikExtractor.score_questions``): the product prefix, one ask per STD field the
   catalogue columns lack (``prepare(...).fields`` under the default ``EnrichOptions``, the question of
   ``loglik.QUESTIONS`` and the field's spoken labels), and one ask per grounded "part" phrase
   (``phrases.candidate_phrases``; the question of ``phrase_llm.QUESTION`` and the RE field names).
   Products with the same text and asked fields share one tree (H&M colourways). The gold set (both
   splits) is exported too, every STD field asked, so the same run gives the accuracy the defaults are
   chosen on. Writes ``spec.npz`` (token ids only: carry it, keep it out of git) and ``index.json.gz``
   (which product is which tree: stays here).
2. **run** (GPU): ``python3 src/atelier/enrich/gpu.py run --spec spec.npz --gguf-dir G --out OUT
   --lora lora=data/adapters/gemma3-270m-std-lora`` scores every tree with the base model and with the
   committed LoRA (merged), writes the best candidate per ask (raw and calibrated) and the timings.
3. **collect** (here): ``python -m benchmarks.bench_enrich_gpu collect --picks OUT --index .../index.json.gz``
   turns the picks into predictions for the gold set (``gold-picks.json``, read by
   ``bench_extraction.py gold-std/gold-re``) and, with ``--ship``, runs the ``hybrid`` extractor over every
   product of the catalogue with its LLM sources answered from the picks, so the records are the CPU
   path's own (``core.run_prepared``: parse, validate, item JSON) under the hybrid's model id, and writes
   them as ``data/enriched/<dataset>-enriched.jsonl.gz`` + manifest (``atelier.enrich.shipped``).

``carry`` splits the GGUF into chunks small enough to travel with the working tree (64 MiB a call).

**ship** (here, one command): ``python -m benchmarks.bench_enrich_gpu ship --dataset hm`` writes
``data/enriched/hm-enriched.jsonl.gz`` + manifest directly, for a ``field_sources.toml`` with no LLM source
(today's: no LLM beat the keyword / majority / TF-IDF baselines on the gold train split, so there is nothing
for the GPU to score); it refuses a configuration with LLM sources, which needs export / run / collect --ship.
Its records are those ``atelier run``'s enrichment stage (``atelier.pipeline.enrich``) would make on the CPU.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- export (here)


class Tokens:
    """llama.cpp's tokenizer (vocabulary only) and the CPU scorer's questions and labels."""

    def __init__(self) -> None:
        from llama_cpp import Llama

        from atelier.config import Settings
        from atelier.enrich.embedded import ensure_gguf
        from atelier.enrich.loglik import _TURN, LogLikExtractor
        from atelier.enrich.phrase_llm import ANSWERS, QUESTION

        settings = Settings()
        path = ensure_gguf(settings.gguf_path())
        self.vocab = Llama(model_path=str(path), vocab_only=True, verbose=False)
        # The scorer's own question and label code, with the vocabulary-only tokenizer: no weights loaded.
        self.scorer = LogLikExtractor(path)
        self.scorer._llm = self.vocab
        self.head, self.tail = _TURN.split("{product}")
        self.answers = [self.tok(w) for w in ANSWERS]
        q_head, q_tail = QUESTION.split("{phrase}")
        self.re_head = self.tok(self.tail.split("{question}")[0] + q_head)
        self.re_tail = self.tok(q_tail + self.tail.split("{question}")[1])
        self.question = QUESTION

    def tok(self, text: str, bos: bool = False) -> list[int]:
        """Token ids as llama.cpp makes them."""
        return list(self.vocab.tokenize(text.encode("utf-8"), add_bos=bos, special=True))

    def prefix(self, text: str) -> list[int]:
        """The product prefix of every ask (``score_questions``' ``Product: <text>``)."""
        return self.tok(self.head + f"Product: {text}", bos=True)

    def std(self, field: str) -> tuple[list[int], list[list[int]]]:
        """(question tokens, label token lists) of an STD field."""
        q = self.tok(self.tail.replace("{question}", self.scorer._question(field)))
        return q, self.scorer._field(field).tokens

    def re_question(self, phrase: str) -> tuple[list[int], bool]:
        """(tokens, full): the phrase's own tokens when head + phrase + tail tokenise as the whole question,
        else the whole question's tokens (``full``)."""
        whole = self.tok(self.tail.replace("{question}", self.question.format(phrase=phrase)))
        own = self.tok(phrase)
        if self.re_head + own + self.re_tail == whole:
            return own, False
        return whole, True


class SetWriter:
    """One exported set: flat token arrays with offsets (see ``atelier.enrich.gpu.read_spec``)."""

    def __init__(self) -> None:
        self.prefix: list[np.ndarray] = []
        self.std: list[list[int]] = []
        self.re_tok: list[np.ndarray] = []
        self.re_full: list[int] = []
        self.re_count: list[int] = []

    def add(self, prefix: list[int], std: list[int], re_q: list[tuple[list[int], bool]]) -> None:
        """One tree: prefix tokens, STD field ids, RE part questions."""
        self.prefix.append(np.asarray(prefix, np.int32))
        self.std.append(std)
        for toks, full in re_q:
            self.re_tok.append(np.asarray(toks, np.int32))
            self.re_full.append(int(full))
        self.re_count.append(len(re_q))

    def arrays(self, name: str) -> dict[str, np.ndarray]:
        """The set's arrays under ``<name>.``."""
        def cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)

        def off(lengths: list[int]) -> np.ndarray:
            return np.cumsum([0, *lengths]).astype(np.int64)

        return {f"{name}.prefix": cat(self.prefix, np.int32), f"{name}.prefix_off": off([len(p) for p in self.prefix]),
                f"{name}.std": cat([np.asarray(s, np.int16) for s in self.std], np.int16),
                f"{name}.std_off": off([len(s) for s in self.std]),
                f"{name}.re_tok": cat(self.re_tok, np.int32), f"{name}.re_tok_off": off([len(t) for t in self.re_tok]),
                f"{name}.re_full": np.asarray(self.re_full, np.uint8), f"{name}.re_off": off(self.re_count)}


def export(dataset: str, out: Path, limit: int | None, gold: bool) -> None:
    """Trees of every distinct product of ``dataset`` (and of the gold set); ``spec.npz`` + ``index.json.gz``."""
    from atelier.config import Settings
    from atelier.enrich.batch import load_products
    from atelier.enrich.core import EnrichOptions, prepare
    from atelier.enrich.fieldwise import product_text
    from atelier.enrich.phrases import PHRASES_VERSION, candidate_phrases
    from atelier.enrich.prompt import PROMPT_VERSION
    from atelier.schema import load_schema
    from benchmarks.bench_extraction import GOLD_FIELDS, gold_products
    from benchmarks.gold_set import load as load_gold

    t0 = time.perf_counter()
    settings, schema = Settings(), load_schema()
    tk = Tokens()
    fields = list(schema.std)
    field_id = {f: i for i, f in enumerate(fields)}
    std_q, cand_sets, std_cands = [], [], []
    for f in fields:
        q, cands = tk.std(f)
        std_q.append(q)
        std_cands.append(len(cand_sets))
        cand_sets.append(cands)
    re_cands = len(cand_sets)
    cand_sets.append(tk.answers)
    arrays: dict[str, np.ndarray] = {}
    index: dict[str, Any] = {"fields": fields, "prompt_version": PROMPT_VERSION, "phrases_version": PHRASES_VERSION,
                             "sets": {}}
    stats = {"re_full_questions": 0, "re_questions": 0}

    def tree(w: SetWriter, text: str, title: str, description: str, asked: list[str]) -> dict[str, Any]:
        parts = [c.text for c in candidate_phrases(title, description, schema) if c.role == "part"]
        re_q = [tk.re_question(p) for p in parts]
        stats["re_questions"] += len(re_q)
        stats["re_full_questions"] += sum(full for _, full in re_q)
        w.add(tk.prefix(text), [field_id[f] for f in asked], re_q)
        return {"std": asked, "parts": parts}

    if gold:
        for ds in ("hm", "myntra"):
            path = ROOT / "benchmarks" / "gold" / f"{ds}.jsonl"
            recs = load_gold(path)
            w = SetWriter()
            rows = []
            for rec, p in zip(recs, gold_products(settings, ds, recs), strict=True):
                row = tree(w, product_text(p.title, p.description), p.title, p.description, list(GOLD_FIELDS))
                rows.append({"item_id": rec["item_id"], "split": rec["split"], **row})
            arrays.update(w.arrays(f"gold_{ds}"))
            index["sets"][f"gold_{ds}"] = {"items": rows}
            print(f"gold {ds}: {len(rows)} trees ({time.perf_counter() - t0:.0f}s)", flush=True)
    products = load_products(settings, dataset, limit, schema)
    options = EnrichOptions()
    w = SetWriter()
    keys: dict[tuple[str, tuple[str, ...]], int] = {}
    trees: list[dict[str, Any]] = []
    articles: list[list[Any]] = []
    for n, p in enumerate(products):
        prep = prepare(p, schema, options)
        text = product_text(p.title, p.description)
        key = (text, tuple(prep.fields))
        if key not in keys:
            keys[key] = len(trees)
            trees.append(tree(w, text, p.title, p.description, prep.fields))
        articles.append([p.item_id, prep.input_hash, keys[key]])
        if n % 20000 == 0:
            print(f"{dataset}: {n}/{len(products)} products, {len(trees)} trees ({time.perf_counter() - t0:.0f}s)",
                  flush=True)
    arrays.update(w.arrays(dataset))
    index["sets"][dataset] = {"items": trees, "articles": articles}
    meta = {"fields": fields, "std_questions": std_q, "std_cands": std_cands, "cand_sets": cand_sets,
            "re_cands": re_cands, "re_head": tk.re_head, "re_tail": tk.re_tail, "prior_prefix": tk.prefix("N/A"),
            "sets": {name: len(s["items"]) for name, s in index["sets"].items()}}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out / "spec.npz", **arrays)
    digest = hashlib.sha256((out / "spec.npz").read_bytes()).hexdigest()
    index.update(spec_sha256=digest, dataset=dataset, export_stats=stats, products=len(products))
    (out / "index.json.gz").write_bytes(gzip.compress(json.dumps(index).encode()))
    print(f"written {out / 'spec.npz'} ({(out / 'spec.npz').stat().st_size / 1e6:.1f} MB, sha {digest[:16]}); "
          f"{len(products)} products -> {len(trees)} trees; {stats} ({time.perf_counter() - t0:.0f}s)", flush=True)


def carry(gguf: Path, out: Path, chunk_mb: int) -> None:
    """Split the GGUF into ``part-NN`` files of ``chunk_mb`` MB (one carried per call) plus its sha256."""
    data = gguf.read_bytes()
    out.mkdir(parents=True, exist_ok=True)
    size = chunk_mb * 2**20
    for i in range(0, len(data), size):
        (out / f"part-{i // size:02d}").write_bytes(data[i:i + size])
    (out / "sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")
    print(f"{(len(data) + size - 1) // size} parts of <= {chunk_mb} MB in {out}")


# ---------------------------------------------------------------- collect (here)


def read_picks(picks_dir: Path, index: dict[str, Any]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Per variant and set: per tree, {"std": {field: value (raw)}, "std_cal": {...}, "re": {phrase: RE field}}."""
    from atelier.enrich.phrase_llm import ANSWERS
    from atelier.enrich.phrases import FIELD_WORDS  # noqa: F401  (ANSWERS' keys are these words)
    from atelier.schema import load_schema

    schema = load_schema()
    from atelier.enrich.prompt import label_maps

    values = {f: list(label_maps(schema)[f].values()) for f in index["fields"]}
    answers = list(ANSWERS.values())
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for path in sorted(picks_dir.glob("picks-*.npz")):
        variant = path.stem.split("-", 1)[1]
        z = np.load(path)
        out[variant] = {}
        for name, s in index["sets"].items():
            if f"{name}.best" not in z.files:
                continue
            best, cal, off = z[f"{name}.best"], z[f"{name}.best_cal"], z[f"{name}.offsets"]
            rows = []
            for i, item in enumerate(s["items"]):
                b, c = best[off[i]:off[i + 1]], cal[off[i]:off[i + 1]]
                n_std = len(item["std"])
                assert len(b) == n_std + len(item["parts"]), (name, i)
                rows.append({"std": {f: values[f][int(b[k])] for k, f in enumerate(item["std"])},
                             "std_cal": {f: values[f][int(c[k])] for k, f in enumerate(item["std"])},
                             "re": {p: answers[int(b[n_std + k])] for k, p in enumerate(item["parts"])}})
            out[variant][name] = rows
    return out


def collect(picks_dir: Path, index_path: Path, out: Path, ship: Path | None, name: str) -> None:
    """Gold predictions from the picks (``gold-picks.json``); with ``ship``, the shipped enrichment file."""
    index = json.loads(gzip.decompress(index_path.read_bytes()))
    picks = read_picks(picks_dir, index)
    report = json.loads((picks_dir / "report.json").read_text())
    gold: dict[str, Any] = {"report": report, "variants": {}}
    for variant, sets in picks.items():
        gold["variants"][variant] = {}
        for set_name, rows in sets.items():
            if not set_name.startswith("gold_"):
                continue
            items = index["sets"][set_name]["items"]
            gold["variants"][variant][set_name.removeprefix("gold_")] = [
                {"item_id": it["item_id"], "split": it["split"], **row} for it, row in zip(items, rows, strict=True)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "gold-picks.json").write_text(json.dumps(gold))
    print("written", out / "gold-picks.json")
    if ship is not None:
        ship_catalogue(index, picks, report, ship, name)


def ship_catalogue(index: dict[str, Any] | None, picks: dict[str, Any], report: dict[str, Any] | None, out: Path,
                   name: str, dataset: str = "hm") -> None:
    """Run ``hybrid`` over the catalogue and write the shipped file (``atelier.enrich.shipped.write_shipped``).

    The hybrid's LLM sources answer from the GPU picks (``index``/``picks``/``report`` of ``collect``); its
    MiniLM / TF-IDF sources from one batched pass over the distinct texts (``shipped.batched_stand_ins``, the
    same models, as ``atelier run``'s enrichment stage does); everything else (keyword rules, majority
    fallbacks, grounded RE phrases, parsing, validation) is the CPU path itself. Stand-ins keep the copied
    backend's answers, and the hybrid's model id names only its configuration and rule versions, so the
    records are what ``atelier enrich --backend hybrid`` caches. Without picks (``ship``) the configuration
    must have no LLM source.
    """
    from atelier.config import Settings
    from atelier.enrich.batch import load_products
    from atelier.enrich.core import EnrichOptions, prepare
    from atelier.enrich.fieldwise import product_text
    from atelier.enrich.hybrid import LLM_METHODS, LOCAL_LLM, HybridExtractor
    from atelier.enrich.shipped import PickedExtractor, batched_stand_ins, write_shipped
    from atelier.schema import load_schema

    dataset = index["dataset"] if index is not None else dataset
    settings, schema = Settings(), load_schema()
    products = load_products(settings, dataset, None, schema)
    hybrid = HybridExtractor(settings=settings)
    llm = sorted({f for f, s in hybrid.sources.fields.items() if s.method in LLM_METHODS}
                 | ({"re"} if hybrid.sources.re in LOCAL_LLM else set()))
    backends: dict[str, Any] = {}
    if index is not None:
        arts = index["sets"][dataset]["articles"]
        assert [p.item_id for p in products] == [a[0] for a in arts], "catalogue changed since export"
        by_text: dict[str, dict[str, Any]] = {}
        for variant, sets in picks.items():
            rows = sets.get(dataset, [])
            table: dict[str, Any] = {}
            for p, (_, _, t) in zip(products, arts, strict=True):
                table.setdefault(product_text(p.title, p.description), rows[t])
            by_text[variant] = table
        backends.update(PickedExtractor.for_hybrid(hybrid, by_text, products))
    elif llm:
        raise SystemExit(f"field_sources.toml has LLM sources ({', '.join(llm)}): score them on the GPU first "
                         "(export, gpu.py run, collect --ship; see the module docstring)")
    t0 = time.perf_counter()
    options = EnrichOptions()
    asks = []
    for p in products:
        prep = prepare(p, schema, options)
        asks.append((p.title, p.description, prep.fields))
    batched = batched_stand_ins(hybrid.with_backends(backends), asks)
    print(f"batched picks {sorted(batched)}: {time.perf_counter() - t0:.0f}s", flush=True)
    backends.update(batched)
    hybrid._backends.update(backends)
    t0 = time.perf_counter()
    how = ("bench_enrich_gpu.py collect --ship: LLM sources answered from the GPU picks" if index is not None else
           "bench_enrich_gpu.py ship: on the CPU (this configuration has no LLM source, so no GPU scoring)")
    manifest = write_shipped(products, hybrid, schema, options, out, name, dataset, extra={
        "how": how + "; hybrid over every distinct product through the CPU path (prompt, parse, validation); "
               "MiniLM and TF-IDF sources from one batched pass over the distinct texts",
        "command": " ".join(["python -m benchmarks.bench_enrich_gpu", *sys.argv[1:]]),
        "sources": {f: s.backend for f, s in hybrid.sources.fields.items()}, "re": hybrid.sources.re,
        "versions": hybrid.versions(), "llm_sources": llm,
        "stand_ins": {k: v.model_id for k, v in backends.items()},
        "gpu_run": report, "spec_sha256": None if index is None else index.get("spec_sha256"),
        "trees": None if index is None else len(index["sets"][dataset]["items"])})
    print(json.dumps({k: v for k, v in manifest.items() if k != "gpu_run"}, indent=1),
          f"({time.perf_counter() - t0:.0f}s)")


# ---------------------------------------------------------------- item tower with shipped RE (history)

def pack_tower(dataset: str, out: Path, run_dir: Path) -> None:
    """``benchmarks/item_tower_gpu.py pack`` with the shipped RE values merged into the item JSON.

    The packed file trains on the GPU like the columns-only one (``item_tower_gpu.py train``);
    ``tower-eval`` then scores each checkpoint through the harness with the same RE inputs.
    """
    import numpy as np
    import torch

    from atelier.catalogue import column_items
    from atelier.config import Settings
    from atelier.enrich.shipped import with_shipped_re
    from atelier.ingest import load_tables
    from atelier.models.item_tower import item_inputs
    from atelier.text import encode_texts, item_texts
    from atelier.vocab import Vocab

    settings = Settings(run_dir=run_dir)
    vocab = Vocab.load(settings.paths.vocab)
    items = load_tables(settings.paths.dataset(dataset))[0]
    jsons = with_shipped_re(column_items(items, dataset), dataset)
    titles = items["title"].fillna("").astype(str).tolist()
    texts = item_texts(titles, items["description"].fillna("").astype(str).tolist())
    x = item_inputs(jsons, vocab, encode_texts(texts, settings.paths.features))
    text = x.text[:, 0].numpy()
    unique, inverse = np.unique(text, axis=0, return_inverse=True)
    fields = ("std_ids", "std_field_ids", "std_mask", "re_ids", "re_parent_ids", "re_field_ids", "re_mask")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dataset": dataset, "vocab": vocab.to_dict(),
                "tokens": {
                    f: (getattr(x.tokens, f).int() if f.endswith("ids") else getattr(x.tokens, f)) for f in fields},
                "text_unique": torch.from_numpy(unique).half(),
                "text_index": torch.from_numpy(inverse.reshape(-1)).int(),
                "item_ids": items["item_id"].astype(str).tolist()}, out)
    n_re = int(x.tokens.re_mask.any(1).sum())
    print(f"packed {len(items)} items, RE tokens on {n_re} ({out.stat().st_size / 2**20:.1f} MiB)")


def tower_eval(dataset: str, checkpoints: Path, run_dir: Path, out: Path) -> None:
    """Harness scores of item-tower checkpoints trained with and without the shipped RE values."""
    from atelier.catalogue import column_items
    from atelier.config import Settings
    from atelier.enrich.shipped import with_shipped_re
    from atelier.evaluate import evaluate, write_report
    from atelier.models.item_tower import item_inputs, mask_parts
    from atelier.recommend.baselines import TextKNNRecommender
    from atelier.recommend.content import ItemTowerRecommender
    from atelier.recommender import Recommender, TrainData
    from atelier.text import encode_texts, item_texts
    from atelier.vocab import Vocab

    class WithRE(ItemTowerRecommender):
        """The tower over item JSON that carries the shipped RE values."""

        def item_vectors(self, data: TrainData) -> Any:
            from atelier.models.item_tower import encode_items, load_checkpoint

            model, payload = load_checkpoint(self.checkpoint)
            vocab = Vocab.from_dict(payload["vocab"])
            jsons = with_shipped_re(column_items(data.items, data.dataset), data.dataset)
            texts = item_texts(data.items["title"].fillna("").astype(str).tolist(),
                               data.items["description"].fillna("").astype(str).tolist())
            x = item_inputs(jsons, vocab, encode_texts(texts, data.cache_dir))
            return encode_items(model, mask_parts(x, **self.parts))

    settings = Settings(run_dir=run_dir)
    recs: list[Recommender] = [TextKNNRecommender(3.0)]
    for path in sorted(checkpoints.glob(f"item_tower-{dataset}-*.pt")):
        key = path.stem.split(f"{dataset}-", 1)[1]
        with_re = key.startswith("re_")
        parts = key.removeprefix("re_")
        flags = {"std_re_text": (True, True, True), "std_re": (True, True, False), "text": (False, False, True),
                 "std_text": (True, False, True)}[parts]
        cls = WithRE if with_re else ItemTowerRecommender
        recs.append(cls(path, window_days=3.0, name=f"tower:{key}", use_std=flags[0], use_re=flags[1],
                        use_text=flags[2]))
    report = evaluate(dataset, settings.paths.dataset(dataset), recs, settings.paths.features,
                      on_model=lambda n: print("evaluating", n, flush=True))
    report["command"] = f"python -m benchmarks.bench_enrich_gpu tower-eval --checkpoints {checkpoints}"
    path = write_report({**report, "dataset": f"{dataset}-item-tower-re"}, out)
    for name, m in report["models"].items():  # type: ignore[attr-defined]
        a, h = m["cohorts"]["all"], m["cohorts"]["with_history"]
        print(f"{name:24s} MAP@12 {a['map@12']:.4f}  R@100 {a['recall@100']:.4f}  hist MAP@12 {h['map@12']:.4f}  "
              f"cold R@100 {m['cold_items']['recall@100']:.4f}")
    print("report:", path)




def main() -> None:
    """``export``, ``carry`` and ``collect`` here; ``run`` there is ``src/atelier/enrich/gpu.py run``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("export")
    ex.add_argument("--dataset", default="hm")
    ex.add_argument("--out", type=Path, required=True)
    ex.add_argument("--limit", type=int, help="first N products only (a smoke test)")
    ex.add_argument("--no-gold", action="store_true", help="leave the gold set out")
    ca = sub.add_parser("carry")
    ca.add_argument("--out", type=Path, required=True)
    ca.add_argument("--chunk-mb", type=int, default=40)
    co = sub.add_parser("collect")
    co.add_argument("--picks", type=Path, required=True, help="the folder `gpu.py run` wrote (picks-*.npz, report)")
    co.add_argument("--index", type=Path, required=True)
    co.add_argument("--out", type=Path, required=True, help="where gold-picks.json goes")
    co.add_argument("--ship", type=Path, help="also write the shipped enrichment file into this folder")
    co.add_argument("--name", default="hm-enriched")
    sh = sub.add_parser("ship", help="the shipped file on the CPU, for a configuration without LLM sources")
    sh.add_argument("--dataset", default="hm")
    sh.add_argument("--out", type=Path, default=ROOT / "data" / "enriched")
    sh.add_argument("--name", help="file name stem (default <dataset>-enriched)")
    pk = sub.add_parser("pack-tower")
    pk.add_argument("--dataset", default="hm")
    pk.add_argument("--out", type=Path, required=True)
    pk.add_argument("--run-dir", type=Path, default=Path("runs"))
    te = sub.add_parser("tower-eval")
    te.add_argument("--dataset", default="hm")
    te.add_argument("--checkpoints", type=Path, required=True)
    te.add_argument("--run-dir", type=Path, default=Path("runs"))
    te.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    if args.cmd == "export":
        export(args.dataset, args.out, args.limit, not args.no_gold)
    elif args.cmd == "carry":
        from atelier.config import Settings

        carry(Settings().gguf_path(), args.out, args.chunk_mb)
    elif args.cmd == "collect":
        collect(args.picks, args.index, args.out, args.ship, args.name)
    elif args.cmd == "ship":
        ship_catalogue(None, {}, None, args.out, args.name or f"{args.dataset}-enriched", args.dataset)
    elif args.cmd == "pack-tower":
        pack_tower(args.dataset, args.out, args.run_dir)
    else:
        tower_eval(args.dataset, args.checkpoints, args.run_dir, args.out)


if __name__ == "__main__":
    sys.exit(main())
