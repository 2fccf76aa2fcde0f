"""Ranking: candidates -> features -> LightGBM -> rules -> exploration, over the in-process item cache, with
explanations; item-to-item neighbours and item embeddings. Pure of HTTP: the endpoints call the pipeline."""
