"""Neural models: item tower (stage 1); user tower and reranker arrive with their stages."""
