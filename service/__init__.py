"""Control API, Python SDK and CLI of raylm: the typed, authenticated front door of a shared Ray cluster."""
