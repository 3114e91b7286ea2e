"""Model definitions (single device; parallel forms are built by separate functions).

Each family registers a ``ModelSpec`` (``spec.py``); the rest of the package uses ``get_model_spec``.
"""
