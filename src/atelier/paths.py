"""The run folder's layout: the one place that knows where every artifact lives.

::

    <run_dir>/data/<dataset>/       ingested tables + manifest.json
    <run_dir>/items/<dataset>.<kind>.jsonl   item JSON (kind: columns, enriched)
    <run_dir>/vocab/vocab.json      the dual vocabulary
    <run_dir>/features/             caches keyed by content (MiniLM text vectors, user-tower fits)
    <run_dir>/models/               item_tower-<dataset>.pt, user_tower-<dataset>.pt, ranker-<dataset>.pt, the GGUF
    <run_dir>/vectors/<dataset>/<checkpoint id>.npz   every item's vector under one item-tower checkpoint
    <run_dir>/index/<dataset>.json, <dataset>-two_tower.json   what the store serves (pointers + probes)
    <run_dir>/enrich/cache.jsonl    LLM answers by content hash, prompt version and model
    <run_dir>/reports/              evaluation reports, plots, coverage, neighbour pages
    <run_dir>/serve/                the web service's logs (failed ingests)
    <run_dir>/pgdata/               the embedded PostgreSQL
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GGUF_NAME = "gemma3-270m-q4_k_m.gguf"  # the embedded LLM, assembled from its PyPI parts on first use

# Artifacts committed with a checkout (the settings can point elsewhere): src/atelier/paths.py -> repository root.
REPO_DATA = Path(__file__).resolve().parents[2] / "data"
LORA_ADAPTER_DIR = REPO_DATA / "adapters" / "gemma3-270m-std-lora"  # PEFT LoRA of the log-likelihood scorer
SUPERVISED_MODEL_DIR = REPO_DATA / "adapters" / "tfidf-lr-std"  # TF-IDF + logistic regression per STD field
SHIPPED_ENRICHED_DIR = REPO_DATA / "enriched"  # full-catalogue enrichment made on a GPU


def report_name(dataset: str) -> str:
    """The file name of a dataset's evaluation report in a reports folder."""
    return f"{dataset}.json"


@dataclass(frozen=True)
class RunPaths:
    """Every artifact path under one run folder."""

    root: Path

    # -- data ---------------------------------------------------------------------------------

    @property
    def data(self) -> Path:
        """The ingested datasets' parent folder."""
        return self.root / "data"

    def dataset(self, dataset: str) -> Path:
        """One ingested dataset's tables and manifest."""
        return self.data / dataset

    def items(self, dataset: str, kind: str = "columns") -> Path:
        """A dataset's item JSON lines: ``columns`` (STD from catalogue columns) or ``enriched``."""
        return self.root / "items" / f"{dataset}.{kind}.jsonl"

    @property
    def vocab(self) -> Path:
        """The shared dual vocabulary."""
        return self.root / "vocab" / "vocab.json"

    # -- caches and models --------------------------------------------------------------------

    @property
    def features(self) -> Path:
        """Content-keyed caches of expensive features (MiniLM text vectors)."""
        return self.root / "features"

    @property
    def user_tower_fits(self) -> Path:
        """Every user-tower fit, keyed by a hash of its training log, item vectors and configs."""
        return self.features / "user_towers"

    @property
    def models(self) -> Path:
        """Checkpoints and model files."""
        return self.root / "models"

    def item_tower(self, dataset: str) -> Path:
        """A dataset's item tower checkpoint (the served one: SimCSE, then tuned on behaviour when it has a log)."""
        return self.models / f"item_tower-{dataset}.pt"

    def item_tower_simcse(self, dataset: str) -> Path:
        """The tower after its SimCSE stage alone (what the behaviour stage starts from)."""
        return self.models / f"item_tower-{dataset}-simcse.pt"

    def user_tower(self, dataset: str) -> Path:
        """A dataset's user tower checkpoint (the one that is served)."""
        return self.models / f"user_tower-{dataset}.pt"

    def ranker(self, dataset: str) -> Path:
        """A dataset's DeepFM reranker."""
        return self.models / f"ranker-{dataset}.pt"

    @property
    def gguf(self) -> Path:
        """Where the embedded LLM's GGUF is assembled unless the settings name another file."""
        return self.models / GGUF_NAME

    # -- vectors and the store ----------------------------------------------------------------

    def vectors_dir(self, dataset: str) -> Path:
        """A dataset's encoded vectors, one file per item-tower checkpoint."""
        return self.root / "vectors" / dataset

    def vectors(self, dataset: str, checkpoint_id: str) -> Path:
        """Every item's vector under the checkpoint with this content id."""
        return self.vectors_dir(dataset) / f"{checkpoint_id}.npz"

    def index_pointer(self, dataset: str, model: str = "item_tower") -> Path:
        """What ``atelier index`` (``item_tower``) or the user-tower stage (``two_tower``) loaded into the store."""
        suffix = "" if model == "item_tower" else f"-{model}"
        return self.root / "index" / f"{dataset}{suffix}.json"

    @property
    def pgdata(self) -> Path:
        """The embedded PostgreSQL's data folder."""
        return self.root / "pgdata"

    # -- enrichment, reports, serving ---------------------------------------------------------

    @property
    def enrich_cache(self) -> Path:
        """LLM answers keyed by content hash, prompt version and model id."""
        return self.root / "enrich" / "cache.jsonl"

    @property
    def reports(self) -> Path:
        """Evaluation reports, plots, the coverage report, neighbour pages."""
        return self.root / "reports"

    def enrich_report(self, dataset: str) -> Path:
        """What a dataset's enrichment stage did: counts per route, unreached products, errors."""
        return self.reports / f"enrich-{dataset}.json"

    def evaluation_report(self, dataset: str) -> Path:
        """A dataset's latest evaluation report (``atelier evaluate``, ``atelier run``), its plots beside it."""
        return self.reports / report_name(dataset)

    @property
    def serve_errors(self) -> Path:
        """Failed ingests of the web service, one JSON line each."""
        return self.root / "serve" / "ingest-errors.jsonl"

    @property
    def recommendation_log(self) -> Path:
        """The web service's answers to shoppers with a cart (cart, items, stage; no user id), one JSON line each."""
        return self.root / "serve" / "recommendations.jsonl"
