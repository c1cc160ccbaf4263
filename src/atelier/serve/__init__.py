"""Serving (DESIGN.md section 7): a FastAPI app over the vector store and the loaded models.

- ``app.create_app``: the app factory (routers in ``routes/``, the page in ``static/``)
- ``service.RecommendService``: store, catalogue, models and the cached popular list
- ``stages``: the pluggable recommendation chain (content, popularity; later two-tower, reranker)
- ``products``: cold-start ingest (``Enricher`` hook, item-tower ``ItemEncoder``)
- ``explain``: attribute-level explanations and context keywords
"""

from atelier.serve.app import create_app

__all__ = ["create_app"]
