"""Ray connection, runtime and storage helpers (local paths or s3:// URIs)."""
