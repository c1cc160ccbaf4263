"""The ``atelier`` command line: one thin command per pipeline stage.

Pipeline (each stage resumable; artifacts under the run folder, default ./runs):

    ingest      raw catalogues + interactions -> Parquet (runs/data/<dataset>/)
    vocab       catalogue columns -> STD item JSON, coverage report, vocabulary (runs/vocab/)
    train item  SimCSE item tower on the whole catalogue (runs/models/)
    encode      every item's vector, with its checkpoint id (runs/vectors/)
    evaluate    baselines and models scored on a time split (runs/reports/)
    run         the whole pipeline as far as it exists, then the evaluation table
    serve       the web service and its page (FastAPI + uvicorn)

Exit codes: 0 success, 1 a stage failed (the message says why), 2 bad usage.

Each command imports its stage when it runs, so ``atelier --help`` and a mistyped option answer at once
instead of first loading torch, DeepCTR and the sentence encoder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from atelier.atomic import write_json
from atelier.config import Settings, SettingsError, get_settings
from atelier.ingest import DATASETS, IngestError, IngestResult, ingest

app = typer.Typer(
    help=__doc__,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Logs and pipes get a wide console: the evaluation table has a dozen columns.
console = Console(width=None if Console().is_terminal else 160)
err = Console(stderr=True)
T = TypeVar("T")

DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Folder with hm/, rtr/, myntra/ [env: ATELIER_DATA_DIR]")
]
RunDirOpt = Annotated[Path | None, typer.Option("--run-dir", help="Artifact folder [env: ATELIER_RUN_DIR]")]
CutOpt = Annotated[str | None, typer.Option(
    help="First test day YYYY-MM-DD of the evaluation split (default: the dataset's, else its last fifth of days)")]


class StageError(RuntimeError):
    """A stage failed in a way the user can fix; the CLI prints it and exits 1."""


def _settings(data_dir: Path | None, run_dir: Path | None) -> Settings:
    overrides: dict[str, object] = {}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if run_dir is not None:
        overrides["run_dir"] = run_dir
    return get_settings().model_copy(update=overrides) if overrides else get_settings()


def _run(fn: Callable[[], T]) -> T:
    """Run a stage; known errors become a one-line message and exit code 1 (ATELIER_DEBUG=1: traceback)."""
    try:
        return fn()
    except (SettingsError, IngestError, StageError, ValueError, OSError, RuntimeError) as exc:
        if os.environ.get("ATELIER_DEBUG"):
            raise
        err.print(f"[bold red]error:[/] {exc}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: finished steps are kept; run the command again to resume")
        raise typer.Exit(130) from None


@contextmanager
def stage_progress(title: str) -> Iterator[Progress]:
    """A rich progress display for one stage (bars for counted work, spinners for steps)."""
    with Progress(
        SpinnerColumn(), TextColumn(f"[bold]{title}[/] {{task.description}}"), BarColumn(),
        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
        console=console, transient=False, disable=not console.is_terminal and bool(os.environ.get("CI")),
    ) as progress:
        yield progress


class StageClock:
    """Wall-clock seconds per stage of a long command, in order (``lap`` closes the stage running since the last)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        """Close ``stage`` now: its seconds are the time since the previous lap."""
        now = time.perf_counter()
        self.stages[stage] = round(self.stages.get(stage, 0.0) + now - self.last, 1)
        self.last = now

    def record(self) -> dict[str, object]:
        """Total seconds so far and the stages' seconds, with the machine's core count (the budget is per machine)."""
        return {"seconds": round(time.perf_counter() - self.start, 1), "stages": dict(self.stages),
                "cpu_count": os.cpu_count()}


@app.callback()
def _group() -> None:
    """Keeps ``atelier`` a command group even while a stage has a single command."""


# --------------------------------------------------------------------------- ingest


def run_ingest(settings: Settings, datasets: list[str], force: bool = False) -> list[IngestResult]:
    """Ingest datasets from the data folder with a progress bar; returns one result per dataset."""
    data_dir = settings.require_data_dir()
    results = []
    with stage_progress("ingest") as progress:
        task = progress.add_task("", total=len(datasets))
        for name in datasets:
            def step(msg: str, name: str = name) -> None:
                progress.update(task, description=f"{name}: {msg}")

            results.append(ingest(name, data_dir / name, settings.paths.data, force=force, on_step=step))
            progress.advance(task)
        progress.update(task, description="done")
    return results


def print_ingest(results: list[IngestResult]) -> None:
    """Counts per dataset, rejects by reason, cleaned values."""
    table = Table(title="ingest")
    for col in ("dataset", "items", "interactions", "users", "rejected", "seconds", "cached"):
        table.add_column(col, justify="right" if col not in ("dataset",) else "left")
    for r in results:
        table.add_row(r.dataset, f"{r.counts['items']:,}", f"{r.counts['interactions']:,}",
                      f"{r.counts['users']:,}", f"{r.counts['rejected_rows']:,}", f"{r.seconds:.2f}",
                      "yes" if r.cached else "no")
    console.print(table)
    for r in results:
        for reason, n in {**r.rejects, **r.notes}.items():
            console.print(f"  {r.dataset}: {n:,} × {reason}")


@app.command("ingest")
def ingest_cmd(
    dataset: Annotated[
        list[str] | None, typer.Option("--dataset", "-d", help="hm, rtr, myntra (repeat); default all")
    ] = None,
    source: Annotated[Path | None, typer.Option(help="A column-mapping TOML for a custom catalogue")] = None,
    force: Annotated[bool, typer.Option(help="Re-read sources even if unchanged")] = False,
    data_dir: DataDirOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Read raw catalogues and interactions into normalised Parquet tables with a manifest."""
    settings = _settings(data_dir, run_dir)
    if source is not None:
        result = _run(lambda: ingest("custom", source, settings.paths.data, force=force))
        print_ingest([result])
        return
    names = dataset or list(DATASETS)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        err.print(f"[bold red]error:[/] unknown dataset {unknown}; choose from {list(DATASETS)} or pass --source")
        raise typer.Exit(2)
    print_ingest(_run(lambda: run_ingest(settings, names, force)))


# --------------------------------------------------------------------------- vocab


def run_vocab(settings: Settings, datasets: list[str]) -> tuple[Path, list[dict[str, object]]]:
    """Column item JSON per ingested dataset, the coverage report and one shared vocabulary."""
    from atelier.catalogue import column_items, coverage_report, write_items_jsonl
    from atelier.ingest import load_tables
    from atelier.schema import load_schema
    from atelier.vocab import build_vocab

    schema = load_schema()
    all_items = []
    reports = []
    with stage_progress("vocab") as progress:
        task = progress.add_task("", total=len(datasets))
        for name in datasets:
            progress.update(task, description=f"{name}: STD values from columns")
            items_df = load_tables(settings.paths.dataset(name))[0]
            items = column_items(items_df, name, schema)
            write_items_jsonl(items, settings.paths.items(name))
            reports.append(coverage_report(items_df, name, schema, items))
            all_items.extend(items)
            progress.advance(task)
        vocab = build_vocab(schema, all_items)
        path = settings.run_dir / "vocab" / "vocab.json"
        vocab.save(path)
        report_path = settings.paths.reports / "coverage.json"
        write_json(report_path, reports, indent=2)
        progress.update(task, description=f"done: {vocab.std_size} STD ids, version {vocab.version}")
    return path, reports


def print_coverage(reports: list[dict[str, object]]) -> None:
    """Share of items that get each STD field from catalogue columns alone."""
    table = Table(title="STD coverage from catalogue columns (share of items)")
    table.add_column("field")
    for r in reports:
        table.add_column(f"{r['dataset']} ({r['items']:,})", justify="right")
    fields = list(dict.fromkeys(f for r in reports for f in r["coverage"]))  # type: ignore[attr-defined]
    for f in fields:
        table.add_row(f, *[f"{r['coverage'].get(f, 0.0):.3f}" for r in reports])  # type: ignore[attr-defined]
    console.print(table)


@app.command("vocab")
def vocab_cmd(
    dataset: Annotated[list[str] | None, typer.Option("--dataset", "-d", help="Ingested datasets to include")] = None,
    data_dir: DataDirOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Map catalogue columns to STD values, report coverage, build the dual vocabulary."""
    settings = _settings(data_dir, run_dir)
    names = dataset or [n for n in DATASETS if (settings.paths.dataset(n) / "manifest.json").is_file()]
    if not names:
        err.print("[bold red]error:[/] nothing ingested yet; run `atelier ingest` first")
        raise typer.Exit(1)
    path, reports = _run(lambda: run_vocab(settings, names))
    print_coverage(reports)
    console.print(f"vocabulary: {path}")


# --------------------------------------------------------------------------- item tower

train_app = typer.Typer(help="Train a model: item (SimCSE item tower), user, ranker.", no_args_is_help=True)
app.add_typer(train_app, name="train")


def run_train_item(settings: Settings, dataset: str, cfg: object) -> tuple[Path, dict[str, object]]:
    """Train the item tower with a bar for the text features and one for the SimCSE steps."""
    from atelier.pipeline.item_tower import train_item_stage

    with stage_progress(f"train item ({dataset})") as progress:
        text_task = progress.add_task("text features", total=None)
        step_task = progress.add_task("SimCSE", total=None, start=False)

        def on_text(done: int, total: int) -> None:
            progress.update(text_task, completed=done, total=total)

        def on_step(step: int, total: int, loss: float) -> None:
            progress.start_task(step_task)
            progress.update(step_task, completed=step, total=total, description=f"SimCSE loss {loss:.3f}")

        return train_item_stage(settings, dataset, cfg, text_progress=on_text, progress=on_step)  # type: ignore[arg-type]


@train_app.command("item")
def train_item_cmd(
    dataset: Annotated[str, typer.Option("--dataset", "-d")] = "hm",
    epochs: Annotated[int, typer.Option(help="Passes over the catalogue")] = 3,
    batch_size: Annotated[int, typer.Option(help="Items per step (in-batch negatives)")] = 512,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate")] = 1e-3,
    device: Annotated[str, typer.Option(help="cpu or cuda (torchrun for several GPUs)")] = "cpu",
    no_std: Annotated[bool, typer.Option("--no-std", help="Ablation: hide STD tokens")] = False,
    no_re: Annotated[bool, typer.Option("--no-re", help="Ablation: hide RE tokens")] = False,
    no_text: Annotated[bool, typer.Option("--no-text", help="Ablation: hide text tokens")] = False,
    data_dir: DataDirOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Train the item tower with SimCSE on a dataset's whole catalogue (needs ingest + vocab)."""
    from atelier.train.item import TrainItemConfig

    settings = _settings(data_dir, run_dir)
    cfg = TrainItemConfig(epochs=epochs, batch_size=batch_size, lr=lr, device=device,
                          use_std=not no_std, use_re=not no_re, use_text=not no_text)
    path, history = _run(lambda: run_train_item(settings, dataset, cfg))
    for e in history["epochs"]:  # type: ignore[attr-defined]
        console.print(f"epoch {e['epoch']}: loss {e['loss']:.4f}, {e['seconds']:.1f} s, "
                      f"{e['items_per_s']:,.0f} items/s")
    console.print(f"view alignment@2048: {history['view_alignment@2048']:.3f}\ncheckpoint: {path}")


def run_train_user(settings: Settings, dataset: str, cfg: object, reindex: bool = True,
                   cut: str | None = None) -> tuple[Path, dict[str, object], dict[str, object]]:
    """Train the user tower (one bar for its steps; an identical earlier fit is reused), then load its
    retrieval keys into the store (unless ``reindex`` is off and this checkpoint is indexed already)."""
    from atelier.pipeline.user_tower import index_user_stage, train_user_stage

    with stage_progress(f"train user ({dataset})") as progress:
        task = progress.add_task("sampled softmax", total=None)

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, description=f"sampled softmax loss {loss:.3f}")

        path, history = train_user_stage(settings, dataset, cfg, progress=on_step, cut=cut)  # type: ignore[arg-type]
    with stage_progress(f"index two-tower ({dataset})") as progress:
        index_task = progress.add_task("", total=None)

        def on_index(stage: str, done: int, total: int) -> None:
            progress.update(index_task, description=stage, completed=done, total=total or None)

        report = index_user_stage(settings, dataset, progress=on_index, force=reindex)
    return path, history, report


def run_tune_item(settings: Settings, dataset: str, cfg: object, cut: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Tune the SimCSE tower on behaviour pairs behind a progress bar."""
    from atelier.pipeline.item_tower import tune_item_stage

    with stage_progress(f"tune item tower on behaviour ({dataset})") as progress:
        task = progress.add_task("behaviour pairs", total=None)

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, total=total, description=f"behaviour loss {loss:.3f}")

        return tune_item_stage(settings, dataset, cfg, cut=cut, progress=on_step)  # type: ignore[arg-type]


def tuned(settings: Settings, dataset: str) -> bool:
    """Whether the dataset's served item tower went through the behaviour stage."""
    from atelier.models.item_tower import load_checkpoint

    path = settings.paths.item_tower(dataset)
    return path.is_file() and "behaviour" in load_checkpoint(path)[1].get("stages", [])


@train_app.command("behaviour")
def train_behaviour_cmd(
    dataset: Annotated[str, typer.Option("--dataset", "-d")] = "hm",
    epochs: Annotated[int, typer.Option(help="Passes over the sampled pairs")] = 1,
    max_pairs: Annotated[int, typer.Option(help="Behaviour pairs sampled per pass")] = 60_000,
    lr: Annotated[float, typer.Option(help="Learning rate of the fine-tune")] = 3e-4,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    cut: CutOpt = None,
    data_dir: DataDirOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Tune the SimCSE item tower so items bought together and colourways sit close (pairs from the evaluation
    split's training window; inputs stay content only) and serve it; then `atelier encode` and `index`."""
    from atelier.train.item import BehaviourConfig

    settings = _settings(data_dir, run_dir)
    cfg = BehaviourConfig(epochs=epochs, max_pairs=max_pairs, lr=lr, device=device)
    path, history = _run(lambda: run_tune_item(settings, dataset, cfg, cut))
    console.print(f"pairs: {history['pairs']:,} {history.get('pair_kinds')}; epochs: {history['epochs']}\n"
                  f"item tower: {path} (run `atelier encode -d {dataset}` and `atelier index -d {dataset}`)")


@train_app.command("user")
def train_user_cmd(
    dataset: Annotated[str, typer.Option("--dataset", "-d")] = "hm",
    epochs: Annotated[int, typer.Option(help="Passes over the training examples (early stopping may end sooner)")] = 3,
    batch_size: Annotated[int, typer.Option(help="Examples per step (in-batch negatives)")] = 512,
    lr: Annotated[float, typer.Option(help="Peak AdamW learning rate")] = 1e-3,
    device: Annotated[str, typer.Option(help="cpu or cuda")] = "cpu",
    drop: Annotated[list[str] | None, typer.Option(help="Ablation: hide an input (history, context, profile)")] = None,
    cut: CutOpt = None,
    data_dir: DataDirOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Train the user tower against the frozen item vectors (evaluation training window) and index it."""
    from atelier.train.user import TrainUserConfig

    settings = _settings(data_dir, run_dir)
    cfg = TrainUserConfig(epochs=epochs, batch_size=batch_size, lr=lr, device=device, drop=frozenset(drop or ()))
    path, history, report = _run(lambda: run_train_user(settings, dataset, cfg, cut=cut))
    for e in history.get("epochs", []):  # type: ignore[attr-defined]
        console.print(f"epoch {e['epoch']}: loss {e['loss']:.4f}, validation recall@100 {e['val_recall@100']:.4f}, "
                      f"{e['seconds']:.1f} s")
    console.print(f"best epoch {history.get('best_epoch')} (0 = the untrained tower); checkpoint: {path}")
    console.print(f"store: {report['model_id']}, {report['rows']:,} keys, "
                  f"HNSW recall@100 {report['recall_at_100']:.3f}")


@train_app.command("ranker")
def train_ranker_cmd(
    dataset: Annotated[str, typer.Option("--dataset", "-d")] = "hm",
    epochs: Annotated[int, typer.Option(help="Passes over the rows")] = 3,
    label_periods: Annotated[int | None, typer.Option(
        help="Label periods at the end of the window (default: every one that leaves history before it)")] = None,
    max_queries: Annotated[int, typer.Option(help="Shoppers per label period and kind, sampled beyond that")] = 20000,
    random_init: Annotated[bool, typer.Option(help="Ablation: random STD/RE embeddings, not the item tower's")] = False,
    seed: int = 0,
    cut: CutOpt = None,
    data_dir: DataDirOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Train the ranking chain's DeepFM on every label period of the evaluation training window and save it."""
    from atelier.models.ranker import RankerConfig
    from atelier.train.ranker import RankerTrainConfig

    settings = _settings(data_dir, run_dir)
    tcfg = RankerTrainConfig(epochs=epochs, label_periods=label_periods, max_queries=max_queries, seed=seed)
    cfg = RankerConfig(0, 0, transfer=not random_init, seed=seed)
    path, history = _run(lambda: run_train_ranker(settings, dataset, tcfg, cfg, cut))
    console.print(f"rows: {history['rows']}\nloss: {history.get('loss')}\nfallback for shoppers with nothing known: "
                  f"{history['fallback']} {history.get('fallback_figures', {})}\nranker: {path}")


def run_train_ranker(settings: Settings, dataset: str, tcfg: object, cfg: object,
                     cut: str | None = None) -> tuple[Path, dict[str, Any]]:
    """Train and save a dataset's ranker behind a progress display (label periods, then epochs)."""
    from atelier.pipeline.ranker import train_ranker_stage

    with stage_progress(f"train ranker ({dataset})") as progress:
        task = progress.add_task("candidates and features of each label period", total=None)

        def on_message(message: str) -> None:
            progress.update(task, description=message, advance=1 if message.startswith("epoch") else 0)
            if message.startswith("epoch"):
                progress.update(task, total=getattr(tcfg, "epochs", None))

        return train_ranker_stage(settings, dataset, tcfg, cfg, progress=on_message, cut=cut)  # type: ignore[arg-type]


@app.command("recommend")
def recommend_cmd(
    dataset: Annotated[str, typer.Option("--dataset", "-d")] = "hm",
    user: Annotated[str | None, typer.Option(help="A known user id: their history")] = None,
    item: Annotated[list[str] | None, typer.Option("--item", help="Recently viewed item ids, oldest first")] = None,
    cart: Annotated[list[str] | None, typer.Option("--cart", help="Item ids in the cart")] = None,
    height: Annotated[float | None, typer.Option(help="Height in cm")] = None,
    weight: Annotated[float | None, typer.Option(help="Weight in kg")] = None,
    age: Annotated[int | None, typer.Option(help="Age in years")] = None,
    body_type: Annotated[str | None, typer.Option(help="Body type, e.g. hourglass, athletic")] = None,
    context: Annotated[str | None, typer.Option(help="Occasion or intent, e.g. 'wedding'")] = None,
    k: Annotated[int, typer.Option("-k", min=1, max=100)] = 12,
    exclude_history: Annotated[bool, typer.Option(
        help="Also leave out what the shopper bought (the cart always is)")] = False,
    ranked: Annotated[bool, typer.Option(help="Keep the ranking chain first (if a ranker is trained)")] = True,
    data_dir: DataDirOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """What `atelier serve` answers to POST /recommend for this shopper: the same request, the same stage
    chain (reranker over retrieval, then the other stages), each item with its stage and why."""
    from atelier.serve.schemas import Profile, RecommendRequest
    from atelier.serve.service import RecommendService

    settings = _settings(data_dir, run_dir).model_copy(update={"serve_dataset": dataset})
    profile = {"height_cm": height, "weight_kg": weight, "age": age, "body_type": body_type}

    def answer() -> tuple[RecommendRequest, Any]:
        request = RecommendRequest(
            user_id=user, recent_item_ids=list(item or []), cart=list(cart or []), context=context, k=k,
            profile=Profile.model_validate(profile) if any(v is not None for v in profile.values()) else None,
            exclude_seen=exclude_history)
        service = RecommendService(settings, warm_up=False)
        try:
            if user is not None and user not in service.shop.histories:
                raise ValueError(f"unknown user {user!r} in {dataset}")
            if not ranked:
                service.stages = [s for s in service.stages if s.name != "ranked"]
            return request, service.recommend(request)
        finally:
            service.close()

    request, response = _run(answer)
    given = [f"user {user}" if user else "anonymous", f"{len(request.recent_item_ids)} recent items" if item else "",
             f"a cart of {len(request.cart)}" if cart else "",
             ", ".join(f"{key} {v}" for key, v in profile.items() if v is not None),
             f"context '{context}'" if context else ""]
    served = " -> ".join(dict.fromkeys(r.stage for r in response.items)) or "nothing"
    table = Table(title=f"top {len(response.items)} for {'; '.join(g for g in given if g)} ({served})")
    for col in ("item_id", "score", "title", "stage", "why"):
        table.add_column(col)
    for rec in response.items:
        table.add_row(rec.item_id, "" if rec.score is None else f"{rec.score:.3f}", rec.title, rec.stage,
                      rec.explanation.reason)
    console.print(table)
    for note in response.notes:
        console.print(f"note: {note}")


@app.command("encode")
def encode_cmd(
    dataset: Annotated[str, typer.Option("--dataset", "-d")] = "hm",
    checkpoint: Annotated[Path | None, typer.Option(help="Item tower checkpoint (default: the dataset's)")] = None,
    data_dir: DataDirOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Write every item's vector (with ids and the checkpoint id) for the store."""
    from atelier.pipeline.item_tower import encode_stage, neighbour_report

    settings = _settings(data_dir, run_dir)
    with stage_progress(f"encode {dataset}") as progress:
        progress.add_task("item vectors", total=None)
        out = _run(lambda: encode_stage(settings, dataset, checkpoint))
        page = _run(lambda: neighbour_report(settings, dataset, out))
    console.print(f"vectors: {out}\nnearest neighbours to judge by eye: {page}")


# --------------------------------------------------------------------------- store


def run_index(settings: Settings, dataset: str, vectors: Path | None = None) -> dict[str, object]:
    """Load item vectors into pgvector with a bar per phase (copy, index, probe)."""
    from atelier.pipeline.item_tower import index_stage

    with stage_progress(f"index {dataset}") as progress:
        tasks: dict[str, object] = {}

        def on_progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total or None)
            progress.update(tasks[stage], completed=done, total=total or None)  # type: ignore[arg-type]

        return index_stage(settings, dataset, vectors, on_progress)


def print_index(report: dict[str, object]) -> None:
    """What the load did and what the probe found."""
    probe = report["probe"]
    console.print(
        f"indexed {report['rows']:,} vectors as {report['model_id']}: recall@100 vs exact "
        f"{report['recall_at_100']:.3f}, {probe['duplicate_ids']} duplicate ids, "  # type: ignore[index]
        f"{'ok' if report['ok'] else 'PROBLEMS: ' + '; '.join(report['problems'])}"  # type: ignore[arg-type]
    )


@app.command("index")
def index_cmd(
    dataset: Annotated[str, typer.Option("--dataset", "-d")] = "hm",
    vectors: Annotated[Path | None, typer.Option(help="An `atelier encode` .npz (default: the newest)")] = None,
    data_dir: DataDirOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Load item vectors into PostgreSQL/pgvector (embedded unless DATABASE_URL), build HNSW, verify recall."""
    settings = _settings(data_dir, run_dir)
    report = _run(lambda: run_index(settings, dataset, vectors))
    print_index(report)
    if not report["ok"]:
        raise typer.Exit(1)


@app.command("similar")
def similar_cmd(
    item_id: Annotated[str, typer.Argument(help="An item id of the indexed catalogue")],
    dataset: Annotated[str, typer.Option("--dataset", "-d")] = "hm",
    k: Annotated[int, typer.Option("-k", min=1, max=1000)] = 10,
    colourways: Annotated[bool, typer.Option(help="Keep several colourways of one product")] = False,
    data_dir: DataDirOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """The k nearest items to ITEM_ID by item-tower vector, with their key attributes."""
    from atelier.store import similar
    from atelier.store.pointers import live_model_id

    settings = _settings(data_dir, run_dir)
    hits = _run(lambda: similar(settings, live_model_id(settings.paths, dataset), item_id, k,
                                dedupe_groups=not colourways))
    table = Table(title=f"items like {item_id}")
    for col in ("item_id", "score", "title", "category", "color", "gender"):
        table.add_column(col)
    for h in hits:
        table.add_row(h["item_id"], f"{h['score']:.3f}", str(h["title"]), str(h["category"]), str(h["color"]),
                      str(h["gender"]))
    console.print(table)


# --------------------------------------------------------------------------- evaluate

METRIC_COLUMNS = ("map@12", "recall@12", "ndcg@12", "hitrate@12", "recall@100")


def run_evaluate(
    settings: Settings, dataset: str, models: list[str] | None = None, cut: str | None = None,
    test_file: Path | None = None, max_users: int | None = None, ablations: bool = False, save_ranker: bool = False,
) -> tuple[dict[str, object], Path]:
    """Fit and score the baselines (and any trained models) on one dataset; write the report (``save_ranker``:
    the ranker trained for ``atelier`` on this window becomes the served one)."""
    from atelier.evaluate import evaluate, write_report
    from atelier.pipeline.suites import model_suite

    suite = model_suite(settings, dataset, models, ablations=ablations, save_ranker=save_ranker)
    with stage_progress(f"evaluate {dataset}") as progress:
        task = progress.add_task("", total=len(suite))

        def on_model(name: str) -> None:
            progress.update(task, description=name, completed=[r.name for r in suite].index(name))

        report = evaluate(dataset, settings.paths.dataset(dataset), suite, settings.paths.features,
                          cut=cut, test_file=test_file, max_users=max_users, on_model=on_model)
        progress.update(task, description="done", completed=len(suite))
    return report, write_report(report, settings.paths.reports)


def file_result(settings: Settings, report: dict[str, object], kind: str,
                extra: dict[str, object] | None = None) -> Path:
    """Copy an evaluation report to ``<results>/<kind>-<date>-<dataset>.json`` with the command that made it
    (the README's tables are generated from these files)."""
    import sys
    from datetime import date

    out = settings.result_files_dir() / f"{kind}-{date.today().isoformat()}-{report['dataset']}.json"
    write_json(out, {"command": "atelier " + " ".join(sys.argv[1:]), **report, **(extra or {})}, indent=2,
               default=float)
    return out


def print_report(report: dict[str, object]) -> None:
    """The evaluation table (all test users, the history, new-shopper and cart cohorts, cold items), then what
    each candidate source finds on its own."""
    split: dict[str, Any] = report["split"]  # type: ignore[assignment]
    kind = "validation split" if split.get("validation") else "test"
    table = Table(title=f"{report['dataset']} ({kind}): {split['source']}, train {split['train_days']}, "
                        f"test {split['test_days']}, {split['scored_users']:,} users "
                        f"({split['users_with_history']:,} with history, {split.get('cart_users', 0):,} carts)")
    table.add_column("model")
    for col in (*METRIC_COLUMNS, "MAP@12 hist", "MAP@12 new", "MAP@12 cart", "R@100 cart", "cold R@100", "cov@12",
                "fit s"):
        table.add_column(col, justify="right")
    for name, m in report["models"].items():  # type: ignore[attr-defined]
        allm, hist, new = (m["cohorts"][c] for c in ("all", "with_history", "without_history"))
        cart = m["cohorts"].get("cart", {})
        cold = m["cold_items"]["recall@100"]
        table.add_row(name, *[f"{allm[c]:.4f}" for c in METRIC_COLUMNS], f"{hist.get('map@12', 0):.4f}",
                      f"{new.get('map@12', 0):.4f}", f"{cart.get('map@12', float('nan')):.4f}",
                      f"{cart.get('recall@100', float('nan')):.4f}", "n/a" if cold != cold else f"{cold:.4f}",
                      f"{m['coverage@12']:.4f}", f"{m['fit_seconds']:.1f}")
    console.print(table)
    for key, what in (("sources", "the rule set's sources"), ("chain_sources", "the ranking chain's sources")):
        sources: dict[str, dict[str, dict[str, float]]] = report.get(key, {})  # type: ignore[assignment]
        if not sources:
            continue
        cohorts = list(dict.fromkeys(c for per in sources.values() for c in per))
        table = Table(title=f"{report['dataset']}: {what} on their own (recall@50 / @100 / @200; "
                            "union: recall of all candidates, mean count)")
        table.add_column("source")
        for cohort in cohorts:
            table.add_column(cohort, justify="right")
        for name, per in sources.items():
            table.add_row(name, *[_source_cell(per[c]) if c in per else "" for c in cohorts])
        console.print(table)


def _source_cell(row: dict[str, float]) -> str:
    if "recall@all" in row:
        return f"{row['recall@all']:.3f} of {row['candidates']:.0f}"
    return " / ".join(f"{row[f'recall@{k}']:.3f}" for k in (50, 100, 200))


@app.command("evaluate")
def evaluate_cmd(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="hm or rtr")] = "hm",
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Only these models (repeat)")] = None,
    cut: CutOpt = None,
    test_file: Annotated[Path | None, typer.Option(help="Interactions to test on, in the dataset's format")] = None,
    max_users: Annotated[int | None, typer.Option(help="Score a seeded sample of test users")] = None,
    ablations: Annotated[bool, typer.Option(help="Also the two-tower retriever without each input")] = False,
    data_dir: DataDirOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Score baselines and models on a time split: JSON report + PNG plots + a table."""
    settings = _settings(data_dir, run_dir)
    report, path = _run(lambda: run_evaluate(settings, dataset, model, cut, test_file, max_users, ablations))
    print_report(report)
    console.print(f"report: {path} (plots beside it)")


# --------------------------------------------------------------------------- enrich


@app.command("enrich")
def enrich_cmd(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Ingested dataset: hm, rtr, myntra")] = "hm",
    limit: Annotated[int | None, typer.Option(help="Only the first N products")] = None,
    backend: Annotated[str | None, typer.Option(help="embedded, hybrid, openai... [env: ATELIER_LLM_BACKEND]")] = None,
    full: Annotated[bool, typer.Option(help="Ask every field, also those the catalogue columns give")] = False,
    data_dir: DataDirOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """LLM enrichment: STD values the columns lack and all RE phrases, cached and resumable."""
    from rich.progress import MofNCompleteColumn, TimeRemainingColumn

    from atelier.enrich import EnrichOptions, enrich_dataset, get_extractor

    settings = _settings(data_dir, run_dir)
    if not (settings.paths.dataset(dataset) / "manifest.json").is_file():
        err.print(f"[bold red]error:[/] {dataset!r} is not ingested; run `atelier ingest -d {dataset}` first")
        raise typer.Exit(1)
    extractor = _run(lambda: get_extractor(backend or settings.llm_backend, settings))
    columns = (SpinnerColumn(), TextColumn("[bold]enrich[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not console.is_terminal and bool(os.environ.get("CI"))) as bar:
        task = bar.add_task(f"{dataset} via {extractor.model_id}", total=None, rate="")
        started: list[float] = []

        def on_start(total: int, cached: int) -> None:
            import time

            # ETA and items/s count only the products the model is asked about, not cache hits.
            bar.update(task, total=total - cached, completed=0, description=f"{dataset}: {cached:,} cached, "
                       f"{total - cached:,} to ask {extractor.model_id}")
            started.append(time.perf_counter())

        def on_result(result: object) -> None:
            import time

            if getattr(result, "cached", False):
                return
            bar.advance(task)
            done = bar.tasks[0].completed
            rate = done / max(1e-9, time.perf_counter() - started[0])
            bar.update(task, rate=f"{rate:.2f} items/s")

        summary = _run(lambda: enrich_dataset(settings, dataset, extractor, limit, EnrichOptions(full=full),
                                              on_start=on_start, on_result=on_result))
    table = Table(title=f"enrich {dataset} ({summary.prompt_version}, {summary.backend})")
    for col in ("products", "cached", "ok", "repaired", "errors", "retried", "items/s", "seconds"):
        table.add_column(col, justify="right")
    table.add_row(f"{summary.total:,}", f"{summary.cached:,}", f"{summary.ok:,}", f"{summary.repaired:,}",
                  f"{summary.errors:,}", f"{summary.retried:,}", f"{summary.items_per_s:.2f}",
                  f"{summary.wall_seconds:.1f}")
    console.print(table)
    for what, path in summary.outputs.items():
        console.print(f"{what}: {path}")
    if summary.errors:
        console.print(f"[yellow]{summary.errors} products failed[/]: see {summary.outputs['errors']}; "
                      "run the command again to retry them")


# --------------------------------------------------------------------------- serve


@app.command("serve")
def serve_cmd(
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="Indexed dataset [default: hm]")] = None,
    host: Annotated[str | None, typer.Option(help="Listen address [env: ATELIER_SERVE_HOST]")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env: ATELIER_SERVE_PORT, default 8000]")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="uvicorn processes [env: ATELIER_SERVE_WORKERS]")] = None,
    data_dir: DataDirOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Start the web service and page (FastAPI + uvicorn) over the embedded store (or DATABASE_URL)."""
    import uvicorn

    settings = _settings(data_dir, run_dir)
    overrides = {"serve_dataset": dataset, "serve_host": host, "serve_port": port, "serve_workers": workers}
    settings = settings.model_copy(update={k: v for k, v in overrides.items() if v is not None})
    # Workers are separate processes that build the app from the environment: hand them these settings.
    os.environ.update({"ATELIER_RUN_DIR": str(settings.run_dir), "ATELIER_SERVE_DATASET": settings.serve_dataset})
    if settings.data_dir is not None:
        os.environ["ATELIER_DATA_DIR"] = str(settings.data_dir)
    get_settings.cache_clear()
    console.print(f"serving {settings.serve_dataset} at http://{settings.serve_host}:{settings.serve_port} "
                  f"({settings.serve_workers} worker(s); API docs at /docs; write endpoints "
                  f"{'need the X-API-Key header' if settings.api_key else 'are off until ATELIER_API_KEY is set'})")
    uvicorn.run("atelier.serve.app:app_from_env", factory=True, host=settings.serve_host, port=settings.serve_port,
                workers=settings.serve_workers, log_level="info")


# --------------------------------------------------------------------------- the main job


@app.command("run")
def run_cmd(
    source: Annotated[Path | None, typer.Option(help="A column-mapping TOML: run on that catalogue instead")] = None,
    force: Annotated[bool, typer.Option(help="Redo cached steps")] = False,
    tower_epochs: Annotated[int, typer.Option(help="SimCSE epochs for the item tower on CPU")] = 2,
    max_users: Annotated[int | None, typer.Option(help="Score a seeded sample of test users")] = None,
    enrich_budget: Annotated[float, typer.Option(
        help="Seconds the CPU enricher may spend on products the shipped enrichment file lacks")] = 300.0,
    data_dir: DataDirOpt = None,
    run_dir: RunDirOpt = None,
) -> None:
    """The whole pipeline on the shared data (or the catalogue of --source) as far as each dataset's data
    allows, on embedded defaults; ends with the evaluation tables and how to open the web page.

    Per dataset (``atelier.datasets.rules_for``): ingest, vocabulary, enrichment (the shipped file, then the
    CPU extractors within ``--enrich-budget``), its own item tower (train, encode,
    index) or a borrowed one, and with interactions on two days or more the behaviour-tuned item tower, the user
    tower, the ranking chain and
    the evaluation on its default split (the dataset's cut, else the last fifth of its days)."""
    from atelier.datasets import rules_for
    from atelier.pipeline.item_tower import encode_stage, neighbour_report
    from atelier.train.item import BehaviourConfig, TrainItemConfig
    from atelier.train.user import TrainUserConfig

    settings = _settings(data_dir, run_dir)
    clock = StageClock()
    if source is not None:
        results = [_run(lambda: ingest("custom", source, settings.paths.data, force=force))]
    else:
        data = _run(settings.require_data_dir)
        results = _run(lambda: run_ingest(settings, [n for n in DATASETS if (data / n).is_dir()], force))
    print_ingest(results)
    clock.lap("ingest")
    names = [r.dataset for r in results]
    _, reports = _run(lambda: run_vocab(settings, names))
    clock.lap("vocab")
    print_coverage(reports)
    for name in names:
        if not rules_for(name).own_item_tower:
            continue
        print_enrich(_run(lambda name=name: run_enrich_stage(settings, name, enrich_budget)))  # type: ignore[misc]
        clock.lap(f"enrich {name}")
        if force or not settings.paths.item_tower(name).is_file():
            _, history = _run(lambda name=name: run_train_item(  # type: ignore[misc]
                settings, name, TrainItemConfig(epochs=tower_epochs)))
            console.print(f"item tower {name}: {history['epochs'][-1]}")  # type: ignore[index]
            clock.lap(f"item tower {name} (text vectors, SimCSE)")
        if _has_log(settings, name) and (force or not tuned(settings, name)):
            _, history = _run(lambda name=name: run_tune_item(settings, name, BehaviourConfig()))  # type: ignore[misc]
            console.print(f"item tower {name} tuned on {history['pairs']:,} behaviour pairs: "
                          f"{history['epochs'][-1]}")  # type: ignore[index]
            clock.lap(f"behaviour tuning {name}")
        with stage_progress(f"encode {name}") as progress:
            progress.add_task("item vectors", total=None)
            vectors = _run(lambda name=name: encode_stage(settings, name))  # type: ignore[misc]
            _run(lambda name=name, vectors=vectors: neighbour_report(settings, name, vectors))  # type: ignore[misc]
        print_index(_run(lambda name=name: run_index(settings, name)))  # type: ignore[misc]
        clock.lap(f"encode and index {name}")
    evaluated = []
    for name in names:
        if not _has_log(settings, name):
            continue  # a catalogue without a log to learn from: similar items and search only
        _, user_history, user_index = _run(lambda name=name: run_train_user(  # type: ignore[misc]
            settings, name, TrainUserConfig(), reindex=force))
        console.print(f"user tower {name}: best epoch {user_history.get('best_epoch')}, validation recall@100 "
                      f"{user_history.get('best_val_recall@100', float('nan')):.4f}; store {user_index['model_id']}")
        evaluated.append(name)
        clock.lap(f"user tower {name}")
    for name in evaluated:
        if force:
            settings.paths.ranker(name).unlink(missing_ok=True)
        # the evaluation trains the ranking chain's DeepFM on the default split (or reuses the one saved for this
        # window) and keeps it as the served ranker: one training, the one the report describes
        report, path = _run(lambda name=name: run_evaluate(  # type: ignore[misc]
            settings, name, max_users=max_users, save_ranker=True))
        print_report(report)
        clock.lap(f"ranking chain and evaluation {name}")
        timing: dict[str, object] = {"run": clock.record()}  # the time up to this report (the 30-minute budget)
        filed = "" if source is not None else f"\nresult file: {file_result(settings, report, 'main-job', timing)}"
        console.print(f"report: {path}{filed}")
    shown = next((n for n in names if settings.paths.index_pointer(n).is_file()), names[0])
    console.print(
        f"[bold]done.[/] Reports and plots are in {settings.paths.reports}. Try `atelier similar ITEM_ID -d {shown}` "
        f"for neighbours from pgvector. The web page: run `atelier serve -d {shown}`, then open http://127.0.0.1:8000"
    )


def run_enrich_stage(settings: Settings, dataset: str, budget_s: float) -> dict[str, Any]:
    """The enrichment stage behind a progress bar (shipped records, cache, then the CPU within the budget)."""
    from atelier.pipeline.enrich import enrich_stage

    with stage_progress(f"enrich ({dataset})") as progress:
        task = progress.add_task("products", total=None)

        def on_count(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return enrich_stage(settings, dataset, budget_s, on_count)


def print_enrich(report: dict[str, Any]) -> None:
    """One line per enrichment: where the values came from and what the budget left out."""
    counts = report.get("counts", {})
    line = ", ".join(f"{k} {v:,}" for k, v in counts.items())
    console.print(f"enrich {report.get('dataset', '')}: {line}; report: {report.get('report')}")
    if report.get("not_reached"):
        console.print(f"[yellow]{len(report['not_reached']):,} products not reached in the budget keep their column "
                      "attributes (listed in the report); a re-run resumes[/]")


def _has_log(settings: Settings, dataset: str) -> bool:
    """Whether `atelier run` trains on the dataset's log: its rules say so and it spans two days or more."""
    from atelier.datasets import rules_for
    from atelier.ingest import load_tables

    log = load_tables(settings.paths.dataset(dataset))[1]
    return rules_for(dataset).train_in_run and log["ts"].dt.normalize().nunique() >= 2


def main() -> None:  # pragma: no cover - console entry point
    """Entry point that keeps tracebacks for unexpected errors only."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()

