"""The stages of ``atelier run``, one module per stage: ``item_tower`` (train, encode, index), ``user_tower``
(train, index the keys), ``ranker`` (train the reranker) and ``suites`` (the models an evaluation scores)."""
