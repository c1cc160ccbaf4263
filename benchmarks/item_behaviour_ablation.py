"""Issue #21's ablation: the SimCSE item tower, the same tower tuned on behaviour pairs, and (behaviour only)
a freshly initialised tower of the same shape tuned on the same pairs with no SimCSE stage.

The towers are scored by the evaluation harness on the dataset's default split (validation numbers):
the item tower's own kNN (``item tower``) over the SimCSE vectors and over the tuned ones.
Cold-item recall (test purchases of articles with no sale before the cut) is the number the tuning is for.

Needs a run folder where ``atelier run`` (or ``atelier train item``) left
``models/item_tower-<dataset>-simcse.pt``; the tuned tower is trained here on the split's training window
and written next to it as ``item_tower-<dataset>-behaviour.pt``, the behaviour-only one as
``item_tower-<dataset>-behaviour-only.pt`` (the served tower is not touched)::

    .venv/bin/python -m benchmarks.item_behaviour_ablation --run-dir runs [--max-pairs 60000]

Writes ``benchmarks/results/item-behaviour-<date>-<dataset>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import torch

from atelier.atomic import write_json
from atelier.config import Settings
from atelier.datasets import rules_for
from atelier.evaluate import evaluate, git_commit, machine
from atelier.models.item_tower import ItemTower, load_checkpoint, save_checkpoint
from atelier.pipeline.item_tower import encode_stage, tune_item_stage
from atelier.recommend.content import ItemTowerRecommender
from atelier.recommend.encoder import file_id
from atelier.recommender import Recommender
from atelier.train.item import BehaviourConfig

RESULTS = Path(__file__).resolve().parent / "results"


def tune(settings: Settings, dataset: str, cfg: BehaviourConfig, *,
         from_scratch: bool = False) -> tuple[Path, dict[str, object]]:
    """The behaviour-tuned copy of the SimCSE tower (training window of the default split only), beside it;
    ``from_scratch``: a tower of the SimCSE tower's shape and vocabulary, freshly initialised, tuned instead."""
    simcse = settings.paths.item_tower_simcse(dataset)
    source, name = simcse, "behaviour"
    if from_scratch:
        trained, payload = load_checkpoint(simcse)
        torch.manual_seed(cfg.seed)
        source, name = simcse.with_name(f"item_tower-{dataset}-init.pt"), "behaviour-only"
        save_checkpoint(ItemTower(trained.config), source, payload["vocab"], {"dataset": dataset, "history": {}})
    t0 = time.perf_counter()
    path, history = tune_item_stage(settings, dataset, cfg, out=simcse.with_name(f"item_tower-{dataset}-{name}.pt"),
                                    source=source)
    return path, {**history, "seconds": round(time.perf_counter() - t0, 1)}


def models(settings: Settings, dataset: str, label: str, checkpoint: Path) -> list[Recommender]:
    """The models that read the tower, named after it."""
    vectors = settings.paths.vectors(dataset, file_id(checkpoint))
    if not vectors.is_file():
        encode_stage(settings, dataset, checkpoint)
    window = rules_for(dataset).popularity_days
    suite: list[Recommender] = [ItemTowerRecommender(checkpoint, window_days=window, vectors_file=vectors,
                                                     name=f"item tower ({label})")]
    return suite


def main(argv: list[str] | None = None) -> int:
    """Tune, score both towers, file the result."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=Path("runs"))
    parser.add_argument("--dataset", default="hm")
    parser.add_argument("--max-pairs", type=int, default=BehaviourConfig.max_pairs)
    parser.add_argument("--epochs", type=int, default=BehaviourConfig.epochs)
    parser.add_argument("--max-users", type=int, default=None)
    parser.add_argument("--device", default=BehaviourConfig.device, help="where the behaviour tuning runs")
    parser.add_argument("--no-behaviour-only", dest="behaviour_only", action="store_false",
                        help="skip the freshly initialised tower tuned on behaviour alone")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--git-commit", default=None, help="the commit a copy without .git was made from")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = Settings.model_validate({"run_dir": args.run_dir})
    commit = args.git_commit or git_commit()  # at the start: the code that ran
    cfg = BehaviourConfig(max_pairs=args.max_pairs, epochs=args.epochs, device=args.device)
    tuned, history = tune(settings, args.dataset, cfg)
    print(f"tuned in {history['seconds']} s on {history['pairs']} pairs {history['pair_kinds']}", flush=True)
    suite = [*models(settings, args.dataset, "SimCSE", settings.paths.item_tower_simcse(args.dataset)),
             *models(settings, args.dataset, "SimCSE + behaviour", tuned)]
    behaviour_only = None
    if args.behaviour_only:
        alone, behaviour_only = tune(settings, args.dataset, cfg, from_scratch=True)
        print(f"behaviour only: tuned in {behaviour_only['seconds']} s", flush=True)
        suite += models(settings, args.dataset, "behaviour only", alone)
    report = evaluate(args.dataset, settings.paths.dataset(args.dataset), suite, settings.paths.features,
                      max_users=args.max_users, on_model=lambda m: print(m, flush=True))
    out = args.out or RESULTS / f"item-behaviour-{date.today().isoformat()}-{args.dataset}.json"
    # the report's own provenance first, so this run's (the commit given by --git-commit) wins
    write_json(out, {**report, "command": "python -m benchmarks.item_behaviour_ablation " + " ".join(sys.argv[1:]),
                     "git_commit": commit, "machine": machine(), "device": _device_name(args.device),
                     "date": date.today().isoformat(), "behaviour": history,
                     "behaviour_only": behaviour_only}, indent=2, default=float)
    for name, m in report["models"].items():  # type: ignore[attr-defined]
        coh = m["cohorts"]
        print(f"{name:40s} MAP@12 all {coh['all']['map@12']:.4f} hist {coh['with_history']['map@12']:.4f} "
              f"cart {coh.get('cart', {}).get('map@12', float('nan')):.4f} "
              f"cold R@100 {m['cold_items']['recall@100']:.4f} cart cold R@100 "
              f"{coh.get('cart', {}).get('cold_items', {}).get('recall@100', float('nan'))}")
    print(json.dumps({"result": str(out)}))
    return 0


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    raise SystemExit(main())
