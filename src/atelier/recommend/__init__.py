"""Inference: everything a served recommendation runs, and nothing that trains.

``encoder`` (item-tower inputs and vectors, new products), ``content`` (item-tower kNN), ``user_tower``
(two-tower retrieval), ``ranker`` (DeepFM features and scorer), ``sources`` (named candidate sources
and the rule set), ``baselines`` (popularity and friends), ``chain`` (the stage chain the service runs),
``exact_index`` (exact search in memory). Training lives in ``atelier.train``; import contracts in
``pyproject.toml`` keep this package from importing it.
"""
