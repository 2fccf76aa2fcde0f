"""Training the ranker (from the event log or from interaction histories, locally or on Dask) and measuring it
offline (the shop's log, the published full-ranking protocol, item-to-item)."""
