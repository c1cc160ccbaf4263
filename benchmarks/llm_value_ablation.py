"""Issue #19 item 3: what the LLM-derived item attributes are worth to the models that read them.

Four variants of the item JSON that the item tower and the DeepFM read, all from one enrichment
(``atelier.pipeline.enrich.enrich_stage``, the stage ``atelier run`` runs):

==========  =========================================================================================
``columns``  (a) the catalogue columns only: no ``runs/items/<dataset>.enriched.jsonl``
``std``      (b) columns + the model's STD values for the fields the columns lack (RE phrases removed)
``re``       (c) columns + the grounded RE phrases only (the model's STD values removed)
``both``     (d) the enriched file as ``atelier run`` writes it
==========  =========================================================================================

Each variant gets its own run folder (``<work-dir>/<variant>``) holding the shared ingested tables and
MiniLM feature cache (copied from ``<work-dir>/base``) and its own item file. In it: the SimCSE item tower
(``train_item_stage``, default ``TrainItemConfig`` on ``--device``), its behaviour stage (``tune_item_stage``),
the vectors (``encode_stage``); then the evaluation harness on the dataset's default split (validation
numbers) scores the tower's own kNN (``item tower``) and the ranking chain's ``lightgbm (binary)`` and
``atelier`` (the DeepFM). Variant ``both`` also scores the DeepFM with its STD/RE tables randomly initialised
instead of transferred from the item tower (``atelier (random init)``).

Run (the benchmark data in ``../shared/data`` or ``ATELIER_DATA_DIR``; runs on the CPU too, slowly)::

    .venv/bin/python -m benchmarks.llm_value_ablation --work-dir runs/llm-value --device cuda [--jobs 4] [--resume]

``--jobs`` runs the variants in parallel processes (they share the GPU; the CPU threads are split among
them); ``--resume`` keeps the preparation, the towers and the variants an earlier run in ``--work-dir``
finished. Writes ``benchmarks/results/llm-value-<date>-<dataset>.json`` (``--out`` elsewhere): per variant
the harness report of its models, the tower's training record and what the variant's item file holds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from datetime import date
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
VARIANTS = ("columns", "std", "re", "both")
SHARED = ("data", "vocab", "features")  # what every variant's run folder starts from (read-only there)


def settings_for(run_dir: Path, data_dir: Path | None = None) -> Any:
    """Settings of one run folder (the data folder as configured, unless given)."""
    from atelier.config import Settings

    overrides: dict[str, Any] = {"run_dir": run_dir}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    return Settings.model_validate(overrides)


def prepare(base: Path, dataset: str, data_dir: Path | None, device: str, enrich_budget: float) -> dict[str, Any]:
    """Ingest, vocabulary, the enrichment stage and the catalogue's MiniLM features, once for all variants."""
    from atelier.catalogue import column_items
    from atelier.ingest import ingest, load_tables
    from atelier.pipeline.enrich import enrich_stage
    from atelier.schema import load_schema
    from atelier.text import encode_texts, item_texts
    from atelier.vocab import build_vocab

    settings = settings_for(base, data_dir)
    t0 = time.perf_counter()
    ingest(dataset, settings.require_data_dir() / dataset, settings.paths.data)
    items = load_tables(settings.paths.dataset(dataset))[0]
    schema = load_schema()
    build_vocab(schema, column_items(items, dataset, schema)).save(settings.paths.vocab)  # as `atelier vocab`
    report = enrich_stage(settings, dataset, enrich_budget, progress=False)
    # The feature cache is keyed by the texts, not the device: every later stage reads these vectors.
    encode_texts(item_texts(items["title"].fillna("").astype(str).tolist(),
                            items["description"].fillna("").astype(str).tolist()),
                 settings.paths.features, device=device, batch_size=256 if device.startswith("cuda") else 32)
    return {"enrich": {k: report.get(k) for k in ("counts", "model_id", "llm_fields", "llm_re", "errors", "seconds")},
            "seconds": round(time.perf_counter() - t0, 1)}


def write_variant_items(base: Path, run_dir: Path, dataset: str, variant: str) -> dict[str, int]:
    """The variant's enriched item file in ``run_dir`` (none for ``columns``); returns what it holds."""
    from atelier.catalogue import column_items, load_enriched, write_items_jsonl
    from atelier.ingest import load_tables

    source = settings_for(base).paths.items(dataset, "enriched")
    target = settings_for(run_dir).paths.items(dataset, "enriched")
    target.unlink(missing_ok=True)
    if variant == "columns":
        return {"items": 0}
    if variant == "both":
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        enriched = load_enriched(target)
        return {"items": len(enriched), "with_re": sum(bool(i.reinforced_feature_value) for i in enriched.values())}
    columns = {i.item_id: i.clothes for i in column_items(load_tables(settings_for(base).paths.dataset(dataset))[0],
                                                          dataset)}
    out, model_fields, changed = [], 0, 0
    for item in load_enriched(source).values():
        own = columns.get(item.item_id, {})
        changed += any(item.clothes.get(f) != v for f, v in own.items())  # (d) = (b) + (c) only if none
        if variant == "std":  # columns first, the model's values only for the fields the columns lack
            clothes = {**own, **{f: v for f, v in item.clothes.items() if f not in own}}
            out.append(item.model_copy(update={"clothes": clothes, "reinforced_feature_value": {}}))
            model_fields += len(clothes) - len(own)
        else:  # "re": the columns' STD values and the grounded phrases
            out.append(item.model_copy(update={"clothes": dict(own)}))
    write_items_jsonl(out, target)
    return {"items": len(out), "model_std_values": model_fields, "column_values_changed_by_enrichment": changed,
            "with_re": sum(bool(i.reinforced_feature_value) for i in out)}


def run_variant(variant: str, work_dir: Path, dataset: str, device: str, threads: int,
                max_users: int | None, resume: bool = False, towers_only: bool = False) -> None:
    """Train, tune and encode the variant's item tower in its own run folder, then score its models; the
    result goes to ``<work-dir>/<variant>.json`` (``resume``: a tower this folder already finished is kept)."""
    import torch

    from atelier.atomic import write_json
    from atelier.datasets import rules_for
    from atelier.evaluate import evaluate
    from atelier.models.ranker import RankerConfig
    from atelier.pipeline.item_tower import encode_stage, train_item_stage, tune_item_stage
    from atelier.pipeline.ranker import chain_recommender
    from atelier.recommend.content import ItemTowerRecommender
    from atelier.recommender import Recommender
    from atelier.train.item import BehaviourConfig, TrainItemConfig

    torch.set_num_threads(threads)
    base, run_dir = work_dir / "base", work_dir / variant
    (work_dir / f"{variant}.json").unlink(missing_ok=True)
    settings = settings_for(run_dir)
    done = run_dir / "tower.json"
    t0 = time.perf_counter()
    if resume and done.is_file():
        record = json.loads(done.read_text())
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        for name in SHARED:
            shutil.copytree(base / name, run_dir / name)
        items = write_variant_items(base, run_dir, dataset, variant)
        simcse_cfg, tune_cfg = TrainItemConfig(device=device), BehaviourConfig(device=device)
        _, simcse = train_item_stage(settings, dataset, simcse_cfg)
        tower, tuned = tune_item_stage(settings, dataset, tune_cfg)
        vectors = encode_stage(settings, dataset, tower)
        record = {"variant": variant, "items": items, "tower": str(tower), "vectors": str(vectors),
                  "simcse": {"config": asdict(simcse_cfg), "history": simcse},
                  "behaviour": {"config": asdict(tune_cfg), "history": tuned},
                  "tower_seconds": round(time.perf_counter() - t0, 1)}
        write_json(done, record, indent=1, default=float)
        print(f"[{variant}] item tower trained, tuned and encoded in {record['tower_seconds']} s", flush=True)
    tower, vectors = Path(record["tower"]), Path(record["vectors"])
    suite: list[Recommender] = [
        ItemTowerRecommender(tower, window_days=rules_for(dataset).popularity_days, vectors_file=vectors,
                             name="item tower"),
    ]
    if not towers_only:
        suite += [chain_recommender(settings, dataset, "lightgbm-binary", name="lightgbm (binary)"),
                  chain_recommender(settings, dataset, "deepfm", name="atelier")]
    if variant == "both" and not towers_only:  # transfer vs random init of the DeepFM's STD/RE tables
        suite.append(chain_recommender(settings, dataset, "deepfm", name="atelier (random init)",
                                       cfg=RankerConfig(0, 0, transfer=False)))
    report = evaluate(dataset, settings.paths.dataset(dataset), suite, settings.paths.features, max_users=max_users,
                      on_model=lambda m: print(f"[{variant}] {m}", flush=True))
    for rec in suite:  # the DeepFM's training record (rows, loss, transfer) beside its scores
        history = getattr(rec, "history", None)
        if history:
            report["models"][rec.name]["history"] = {k: history.get(k) for k in  # type: ignore[index]
                                                     ("rows", "fallback", "seconds", "loss", "transfer")}
    result = {**record, "seconds": round(time.perf_counter() - t0, 1), "report": report}
    write_json(work_dir / f"{variant}.json", result, indent=1, default=float)
    print(f"[{variant}] done in {result['seconds']} s", flush=True)


def summary(report: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """The headline numbers of a harness report's models: MAP@12 / Recall@100 per cohort and cold-item
    recall@100."""
    out = {}
    for name, m in report["models"].items():
        coh = m["cohorts"]
        row: dict[str, float | None] = {}
        for cohort in ("all", "with_history", "cart"):
            for metric in ("map@12", "recall@100"):
                row[f"{cohort} {metric}"] = coh.get(cohort, {}).get(metric)
        row["cold recall@100"] = m["cold_items"]["recall@100"]
        out[name] = row
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare once, run every variant, file the result."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/llm-value"))
    parser.add_argument("--data-dir", type=Path, default=None, help="default: the configured data folder")
    parser.add_argument("--dataset", default="hm")
    parser.add_argument("--device", default="cuda" if _cuda() else "cpu")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--jobs", type=int, default=1, help="variants run at once (parallel processes)")
    parser.add_argument("--enrich-budget", type=float, default=300.0, help="as `atelier run --enrich-budget`")
    parser.add_argument("--max-users", type=int, default=None, help="score a seeded sample of test users")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--towers-only", action="store_true", help="score the item tower's kNN only (no ranking chain)")
    parser.add_argument("--resume", action="store_true", help="keep the preparation and variants already done")
    parser.add_argument("--git-commit", default=None, help="the commit a copy without .git was made from")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from atelier.atomic import write_json
    from atelier.evaluate import git_commit, machine

    commit = args.git_commit or git_commit()  # at the start: the code that ran
    work_dir = args.work_dir.resolve()
    done = work_dir / "prepared.json"
    if args.resume and done.is_file():
        prepared = json.loads(done.read_text())
    else:
        prepared = prepare(work_dir / "base", args.dataset, args.data_dir, args.device, args.enrich_budget)
        write_json(done, prepared)
    print(f"prepared in {prepared['seconds']} s: enrichment {prepared['enrich']['counts']}", flush=True)
    todo = [v for v in args.variants if not (args.resume and (work_dir / f"{v}.json").is_file())]
    threads = max(1, (os.cpu_count() or 1) // max(1, min(args.jobs, len(todo))))
    jobs = [(v, work_dir, args.dataset, args.device, threads, args.max_users, args.resume, args.towers_only)
            for v in todo]
    if args.jobs > 1 and len(jobs) > 1:
        import multiprocessing

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(run_variant, *zip(*jobs, strict=True)))
    else:
        for job in jobs:
            run_variant(*job)
    variants = [json.loads((work_dir / f"{v}.json").read_text()) for v in args.variants]
    today = date.today().isoformat()
    out = args.out or RESULTS / f"llm-value-{today}-{args.dataset}.json"
    write_json(out, {
        "command": "python -m benchmarks.llm_value_ablation " + " ".join(sys.argv[1:] if argv is None else argv),
        "git_commit": commit, "machine": machine(), "device": _device_name(args.device), "date": today,
        "dataset": args.dataset, "split": variants[0]["report"]["split"], "prepare": prepared,
        "summary": {v["variant"]: summary(v["report"]) for v in variants},
        "variants": {v["variant"]: v for v in variants},
    }, indent=2, default=float)
    for v in variants:
        for name, row in summary(v["report"]).items():
            print(f"{v['variant']:8s} {name:24s} " + "  ".join(f"{k} {x:.4f}" if x is not None else f"{k} -"
                                                              for k, x in row.items()))
    print(json.dumps({"result": str(out)}))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    raise SystemExit(main())
