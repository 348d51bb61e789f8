"""The annotation server (``kedro annotate``): serves the exported site and stores every click in SQLite."""
