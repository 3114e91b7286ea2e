"""Model definitions (single device; parallel forms are built by separate functions)."""
