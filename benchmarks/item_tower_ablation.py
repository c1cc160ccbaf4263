"""Item tower ablations through the evaluation harness (H&M default split).

Scores, in one report: popularity, repurchase+popularity, text kNN (MiniLM), and the content
recommender over item-tower vectors for each trained variant (STD+RE+text, STD+RE, text only)
plus an untrained tower, so SimCSE's effect and each token type's share are visible.
Checkpoints come from ``benchmarks/item_tower_gpu.py train`` (or ``atelier train item``).

    python -m benchmarks.item_tower_ablation --checkpoints runs/models/gpu --out benchmarks/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

from atelier.config import Settings
from atelier.evaluate import evaluate, write_report
from atelier.recommend.baselines import PopularityRecommender, RepurchaseRecommender, TextKNNRecommender
from atelier.recommend.content import ItemTowerRecommender
from atelier.recommender import Recommender
from atelier.vocab import Vocab

PARTS = {"std_re_text": (True, True, True), "std_re": (True, True, False), "text": (False, False, True)}


def main() -> None:
    """Evaluate every checkpoint found plus baselines; write the report JSON and plots."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="hm")
    parser.add_argument("--checkpoints", type=Path, default=Path("runs/models/gpu"))
    parser.add_argument("--run-dir", type=Path, default=Path("runs"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    settings = Settings(run_dir=args.run_dir)
    window = 3.0 if args.dataset == "hm" else 90.0
    recs: list[Recommender] = [PopularityRecommender(window), RepurchaseRecommender(window), TextKNNRecommender(window)]
    for key, (std, re_, text) in PARTS.items():
        path = args.checkpoints / f"item_tower-{args.dataset}-{key}.pt"
        if path.is_file():
            recs.append(ItemTowerRecommender(path, window_days=window, name=f"tower:{key.replace('_', '+')}",
                                             use_std=std, use_re=re_, use_text=text))
    recs.append(ItemTowerRecommender(None, Vocab.load(settings.paths.vocab), window_days=window,
                                     name="tower:untrained"))
    report = evaluate(args.dataset, settings.paths.dataset(args.dataset), recs, settings.paths.features,
                      on_model=lambda n: print("evaluating", n, flush=True))
    report["command"] = "python -m benchmarks.item_tower_ablation " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())
    path = write_report({**report, "dataset": f"{args.dataset}-item-tower-ablation"}, args.out)
    for name, m in report["models"].items():  # type: ignore[attr-defined]
        a, h = m["cohorts"]["all"], m["cohorts"]["with_history"]
        print(f"{name:24s} MAP@12 {a['map@12']:.4f}  R@12 {a['recall@12']:.4f}  R@100 {a['recall@100']:.4f}  "
              f"hist MAP@12 {h['map@12']:.4f}  cold R@100 {m['cold_items']['recall@100']:.4f}")
    print("report:", path)


if __name__ == "__main__":
    main()
