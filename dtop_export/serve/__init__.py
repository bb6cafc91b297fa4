"""``dtop-export serve``: the online embedding + search service on Ray Serve.

``app`` (HTTP routes, metrics, the driver), ``deployment`` (one engine per replica, batching by input shape),
``limits`` (uploads, the bounded queue, errors as 4xx JSON) and ``client`` (a standard-library Python client).
Engines open through :mod:`dtop_export.corpus.runtime` and images decode through :mod:`dtop_export.preprocess`, as
in ``embed``; ray, fastapi and prometheus_client are imported inside the functions that use them.
"""
