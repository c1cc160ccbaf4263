"""Deployment settings: one pydantic-settings class read from ``ATELIER_*`` env vars and ``.env``.

Experiment hyper-parameters live in dataclasses next to the models; this class only holds what
changes between machines: where the data and the run folder are, which database and which LLM.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from atelier.paths import LORA_ADAPTER_DIR, SHIPPED_ENRICHED_DIR, SUPERVISED_MODEL_DIR, RunPaths


class SettingsError(RuntimeError):
    """A setting is missing or wrong; the message names the setting and how to set it."""


def _default_data_dir() -> Path | None:
    """The shared benchmark data beside the checkout (``../shared/data``), when it is there."""
    # The checkout root is parents[2] of this file (src/atelier/config.py) in an editable install.
    for base in (Path.cwd(), *Path.cwd().parents, Path(__file__).resolve().parents[2]):
        candidate = base.parent / "shared" / "data"
        if (candidate / "hm").is_dir() or (candidate / "rtr").is_dir():
            return candidate
    return None


def _default_results_dir() -> Path | None:
    """The checkout's ``benchmarks/results`` (the README's tables are generated from it), when there is one."""
    candidate = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    return candidate if candidate.is_dir() else None


class Settings(BaseSettings):
    """Where data, artifacts, the database and the LLM are; every field is an ``ATELIER_`` env var."""

    model_config = SettingsConfigDict(env_prefix="ATELIER_", env_file=".env", extra="ignore",
                                      populate_by_name=True)

    data_dir: Path | None = Field(
        default_factory=_default_data_dir,
        description="Folder with hm/, rtr/, myntra/ (default: ../shared/data when present).",
    )
    run_dir: Path = Field(default=Path("runs"), description="Artifacts: ingested data, vocab, models, reports.")
    results_dir: Path | None = Field(
        default_factory=_default_results_dir,
        description="Where `atelier run` files its evaluation as main-job-<date>-<dataset>.json "
                    "(default: the checkout's benchmarks/results; else <run_dir>/results).",
    )
    # Read without the prefix too: DATABASE_URL is the name every PostgreSQL tool knows.
    database_url: str = Field(
        default="",
        validation_alias="DATABASE_URL",
        description="PostgreSQL with pgvector; empty = embedded server under the run folder.",
    )
    llm_backend: str = Field(default="embedded", description="embedded | openai | fake")
    llm_base_url: str = Field(default="", description="OpenAI-compatible server URL (openai backend).")
    llm_model: str = Field(default="", description="Model name on the server (openai backend).")
    llm_api_key: str = Field(default="", description="API key for the server (openai backend).")
    llm_model_path: Path | None = Field(
        default=None, description="GGUF for the embedded backend (default: <run_dir>/models/, assembled on first use)."
    )
    lora_adapter: Path = Field(default=LORA_ADAPTER_DIR, description="PEFT LoRA adapter of `embedded-ll-lora`.")
    supervised_model: Path = Field(default=SUPERVISED_MODEL_DIR,
                                   description="TF-IDF + logistic-regression classifiers of `tfidf-lr`.")
    enriched_dir: Path = Field(default=SHIPPED_ENRICHED_DIR,
                               description="Shipped full-catalogue enrichment files (the `shipped` backend).")
    shipped_dataset: str = Field(default="hm", description="Which shipped file the `shipped` backend answers from.")
    llm_concurrency: int = Field(default=8, ge=1, description="Requests in flight at once (openai backend).")
    llm_timeout_s: float = Field(default=60.0, gt=0, description="Per-request timeout (openai backend).")
    llm_max_retries: int = Field(default=3, ge=0, description="Retries with backoff on 5xx/timeouts (openai backend).")
    llm_threads: int = Field(default=0, ge=0, description="CPU threads of the embedded backend (0 = half the cores).")
    api_key: str = Field(default="", description="Key that write endpoints of the web service require.")
    serve_host: str = Field(default="127.0.0.1", description="Address `atelier serve` listens on.")
    serve_port: int = Field(default=8000, ge=1, le=65535, description="Port `atelier serve` listens on.")
    serve_workers: int = Field(default=1, ge=1, le=64, description="uvicorn worker processes.")
    serve_dataset: str = Field(default="hm", description="Dataset whose indexed model the web service serves.")
    serve_max_body_bytes: int = Field(default=65_536, ge=1024, description="Largest request body accepted (413 above).")
    serve_enricher: str = Field(default="columns", description="Raw product -> item JSON on ingest: columns | llm.")

    @field_validator("run_dir", mode="after")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    def require_data_dir(self) -> Path:
        """The data folder, or a SettingsError that says how to set it."""
        if self.data_dir is None:
            raise SettingsError(
                "no data folder: set ATELIER_DATA_DIR (or pass --data-dir) to a folder holding "
                "hm/, rtr/ or myntra/ (the shared benchmark data was not found beside the checkout)"
            )
        data_dir = self.data_dir.expanduser()
        if not data_dir.is_dir():
            raise SettingsError(f"ATELIER_DATA_DIR={data_dir} is not a folder")
        return data_dir

    def result_files_dir(self) -> Path:
        """The folder of dated result files (``results_dir``, else ``<run_dir>/results``)."""
        return self.results_dir if self.results_dir is not None else self.run_dir / "results"

    def gguf_path(self) -> Path:
        """The embedded LLM's GGUF: ``llm_model_path``, else assembled under the run folder's models."""
        return self.llm_model_path or self.paths.gguf

    @property
    def paths(self) -> RunPaths:
        """Every artifact path under ``run_dir`` (``atelier.paths``)."""
        return RunPaths(self.run_dir)

    def dataset_dir(self, dataset: str) -> Path:
        """Where the ingested Parquet files of one dataset live (``paths.dataset``)."""
        return self.paths.dataset(dataset)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once)."""
    return Settings()
