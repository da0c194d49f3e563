"""The ``halfclose`` command line (entry point layer)."""
