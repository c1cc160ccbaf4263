"""atelier: an LLM-driven, content-based fashion recommender.

Pipeline: ingest -> enrich (LLM -> item JSON) -> vocab -> item tower (SimCSE) -> pgvector ->
user tower -> DeepFM reranker -> serve. See README.md and DESIGN.md.
"""

__version__ = "0.1.0"
