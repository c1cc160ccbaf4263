"""Issue #20's ablations of the served ranking chain, through the harness on the default split (validation
numbers): seeds, candidate sources and feature groups.

Needs a run folder where ``atelier run`` finished (item tower, vectors, user tower). Three groups, each one
``evaluate`` call (every model of a group shares its window, candidates and rows; groups free their memory
in between), each with the rule set as the same-run yardstick:

``seeds``     the DeepFM (``atelier``) and the LightGBM peer (binary) with ``RankerTrainConfig.seed`` 0, 1, 2
              (the seed draws the label periods' shoppers and negatives, and the DeepFM's initialisation)
``sources``   the DeepFM with one group of candidate sources removed from the chain (the spec it is trained
              and scored with): content neighbours, new arrivals, colourways, co-bought, category popularity
``features``  the DeepFM with one group of dense features blanked (set to NaN: the scaler's missing value)
              in training and scoring: source ranks/scores, popularity and freshness, price, the shopper's
              own purchases of the item and its product, attribute shares, vector similarities, the shopper

Run::

    .venv/bin/python -m benchmarks.chain_ablation --run-dir runs [--groups seeds sources features] [--max-users N]

Writes ``benchmarks/results/chain-ablation-<date>-<dataset>.json`` (``--out`` elsewhere): per group the
harness report (with ``chain_sources``, each source's own recall). Groups already in that file and not
named in ``--groups`` are kept (a group that failed can be run again alone).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np

from atelier.atomic import write_json
from atelier.config import Settings
from atelier.datasets import rules_for
from atelier.evaluate import evaluate, git_commit, machine
from atelier.pipeline.ranker import chain_parts
from atelier.recommend.candidates import CandidateSet
from atelier.recommend.ranking import RankingSpec, RowScorer
from atelier.recommend.sources import RulesRecommender
from atelier.recommender import Query, Recommender, TrainData
from atelier.train.ranker import ChainRecommender, RankerTrainConfig, Rows
from benchmarks.llm_value_ablation import summary

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = ("seeds", "sources", "features")

# Candidate sources removed together (prefixes of the spec's source names).
SOURCE_GROUPS = {"content neighbours": ("near:",), "new arrivals": ("new:",), "colourways": ("colourways",),
                 "co-bought": ("co-bought",), "category popularity": ("category-popularity",)}
# Dense feature groups (prefixes of ``recommend.features.feature_names``).
FEATURE_GROUPS = {
    "source ranks and scores": ("rank:", "score:", "n_sources"),
    "popularity and freshness": ("pop_", "trend", "days_since_first", "days_since_last", "never_sold"),
    "price": ("log_price", "price_vs_shopper"),
    "shopper-item history": ("bought_n", "bought_days", "same_group_n"),
    "attribute shares": ("share:",),
    "vector similarities": ("sim_",),
    "shopper": ("history_len", "days_since_last_buy", "n_seeds", "has_cart"),
}


class BlankedScorer:
    """A scorer that sees the chosen feature columns as missing (NaN), in training and when scoring."""

    def __init__(self, inner: RowScorer, blank: np.ndarray) -> None:
        self.inner, self.blank, self.name = inner, blank, f"{inner.name} (blanked)"

    def predict(self, queries: Sequence[Query], cands: CandidateSet, x: np.ndarray) -> np.ndarray:
        """The inner scorer's scores with the blanked columns set to NaN."""
        return self.inner.predict(queries, cands, blanked(x, self.blank))


def blanked(x: np.ndarray, blank: np.ndarray) -> np.ndarray:
    """A copy of ``x`` with the ``blank`` columns set to NaN."""
    out = x.copy()
    out[:, blank] = np.nan
    return out


class BlankedChain(ChainRecommender):
    """The chain's DeepFM trained and scored with one group of dense features blanked."""

    def __init__(self, *args: Any, prefixes: Sequence[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prefixes = tuple(prefixes)

    def _train(self, rows: Rows, data: TrainData) -> tuple[RowScorer, dict[str, Any]]:
        blank = np.array([name.startswith(self.prefixes) for name in rows.names])
        if not blank.any():
            raise ValueError(f"no feature starts with {self.prefixes}; features: {rows.names}")
        masked = Rows([replace(p, x=blanked(p.x, blank)) for p in rows.periods], rows.names, rows.info)
        scorer, record = super()._train(masked, data)
        names = [n for n, b in zip(rows.names, blank, strict=True) if b]
        return BlankedScorer(scorer, blank), {**record, "blanked": names}


def without_sources(spec: RankingSpec, prefixes: Sequence[str]) -> RankingSpec:
    """The spec with every source whose name starts with one of ``prefixes`` removed."""
    kept = tuple(s for s in spec.sources if not s.startswith(tuple(prefixes)))
    if kept == spec.sources:
        raise ValueError(f"no source of {spec.sources} starts with {tuple(prefixes)}")
    return replace(spec, sources=kept, depth={s: spec.depth[s] for s in kept})


def suite(settings: Settings, dataset: str, group: str) -> list[Recommender]:
    """The models of one group, the rule set first."""
    spec, vectors, tower = chain_parts(settings, dataset)
    enriched = settings.paths.items(dataset, "enriched")
    rules: list[Recommender] = [RulesRecommender(rules_for(dataset).popularity_days)]

    def chain(model: str, name: str, spec: RankingSpec = spec, seed: int = 0, cls: type = ChainRecommender,
              **kw: Any) -> Recommender:
        rec: Recommender = cls(model, spec, vectors, tower, tcfg=RankerTrainConfig(seed=seed), enriched=enriched,
                               name=name, **kw)
        return rec

    if group == "seeds":
        return rules + [chain(model, f"{name} (seed {seed})", seed=seed) for seed in (0, 1, 2)
                        for model, name in (("deepfm", "atelier"), ("lightgbm-binary", "lightgbm (binary)"))]
    if group == "sources":
        return rules + [chain("deepfm", f"atelier - {label}", without_sources(spec, prefixes))
                        for label, prefixes in SOURCE_GROUPS.items()
                        if any(s.startswith(prefixes) for s in spec.sources)]
    if group == "features":
        blanked_chains = [chain("deepfm", f"atelier - {label}", cls=BlankedChain, prefixes=prefixes)
                          for label, prefixes in FEATURE_GROUPS.items()]
        return [*rules, chain("deepfm", "atelier"), *blanked_chains]
    raise ValueError(f"unknown group {group!r}; choose from {GROUPS}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen groups one after the other, file the result."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs"))
    parser.add_argument("--dataset", default="hm")
    parser.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS))
    parser.add_argument("--max-users", type=int, default=None, help="score a seeded sample of test users")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = Settings.model_validate({"run_dir": args.run_dir})
    commit, today = git_commit(), date.today().isoformat()  # at the start: the code that ran
    out = args.out or RESULTS / f"chain-ablation-{today}-{args.dataset}.json"
    groups: dict[str, Any] = {}
    if out.is_file():  # groups an earlier run of the same day filed stay, unless run again now
        earlier = json.loads(out.read_text())
        groups = {g: v for g, v in earlier.get("groups", {}).items() if g not in args.groups}
    for group in args.groups:
        t0 = time.perf_counter()

        def progress(model: str, group: str = group, t0: float = t0) -> None:
            print(f"[{group} {time.perf_counter() - t0:6.0f} s] {model}", flush=True)

        report = evaluate(args.dataset, settings.paths.dataset(args.dataset), suite(settings, args.dataset, group),
                          settings.paths.features, max_users=args.max_users, on_model=progress)
        groups[group] = {"seconds": round(time.perf_counter() - t0, 1), "git_commit": commit,
                         "command": "python -m benchmarks.chain_ablation " + " ".join(sys.argv[1:] if argv is None
                                                                                      else argv),
                         "summary": summary(report), "report": report}
        for name, row in groups[group]["summary"].items():
            print(f"{group:8s} {name:40s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items() if v is not None),
                  flush=True)
        gc.collect()
        first: dict[str, Any] = next(iter(groups.values()))["report"]
        write_json(out, {  # after every group: an interrupted run keeps what finished
            "command": "python -m benchmarks.chain_ablation " + " ".join(sys.argv[1:] if argv is None else argv),
            "git_commit": commit, "machine": machine(), "date": today, "dataset": args.dataset,
            "split": first["split"], "groups": groups,
        }, indent=1, default=float)
    print(json.dumps({"result": str(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
