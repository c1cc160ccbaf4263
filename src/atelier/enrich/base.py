"""The extractor interface: one abstract method (messages + JSON schema -> raw text) and a registry.

A backend only talks to a model. Prompt building, parsing, repair, retries on bad JSON, caching
and batching live in the other modules of this package, so every backend gets them for free and
the deterministic fake exercises exactly the code path the real models take.
(Pattern: simonw/llm ``Model`` subclasses with a registry and a shipped ``MockModel``.)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    from atelier.config import Settings

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "ExtractionRequest",
    "Extractor",
    "UnknownBackendError",
    "available_backends",
    "get_extractor",
    "register",
]


class BackendError(RuntimeError):
    """The backend could not produce an answer (server down after retries, model missing...)."""


class BackendUnavailable(BackendError):
    """The backend cannot run here at all (package, model, adapter or grammar missing or broken).

    Every request would fail the same way, so callers may fall back to another *named* backend
    (``hybrid`` does, and says so in its model id); a backend must never answer with a different
    model under its own id instead.
    """


class UnknownBackendError(ValueError):
    """No backend is registered under that name; the message lists the known ones."""


@dataclass(frozen=True)
class ExtractionRequest:
    """What a backend is asked: chat messages and the JSON schema the answer must follow."""

    item_id: str
    messages: list[dict[str, str]]
    schema: dict[str, Any]
    max_tokens: int = 512
    # Free-form hints for deterministic backends (the fake reads the product text from here).
    context: dict[str, Any] = field(default_factory=dict)


class Extractor(ABC):
    """A model that answers an ``ExtractionRequest`` with raw text (ideally JSON per the schema)."""

    name: ClassVar[str] = ""
    #: how many requests the batch runner may have in flight at once for this backend
    concurrency: int = 1
    #: whether the backend enforces the JSON schema while decoding (grammar / server-side)
    constrained: bool = True

    @property
    @abstractmethod
    def model_id(self) -> str:
        """Backend + model identity, part of the cache key (change the model, miss the cache)."""

    @abstractmethod
    def complete(self, request: ExtractionRequest) -> str:
        """The model's raw answer to ``request``; raise ``BackendError`` when none can be had."""

    @classmethod
    def from_settings(cls, settings: Settings) -> Extractor:
        """Build the backend from deployment settings (backends with options override this)."""
        return cls()

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release model memory or connections."""


E = TypeVar("E", bound=type[Extractor])
_REGISTRY: dict[str, type[Extractor]] = {}


def register(name: str) -> Callable[[E], E]:
    """Class decorator: make a backend available to ``get_extractor`` under ``name``."""

    def deco(cls: E) -> E:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"backend {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available_backends() -> list[str]:
    """Names of the registered backends."""
    return sorted(_REGISTRY)


def get_extractor(name: str, settings: Settings | None = None) -> Extractor:
    """The backend registered as ``name``, built from ``settings`` (default: the process settings)."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise UnknownBackendError(f"unknown LLM backend {name!r}; known backends: {', '.join(available_backends())}")
    if settings is None:
        from atelier.config import get_settings

        settings = get_settings()
    return cls.from_settings(settings)
