"""HTML reports with plots: what `selaras personas` and `selaras evaluate ranking` found, rendered by those
commands (`pages.py`, charts as inline SVG in `svg.py`), kept in the shared store (`store.py`) and served by the
recommend service at /reports/ next to /experiments (`endpoints.py`, `static/`). Imports no service."""
