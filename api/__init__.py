"""The HTTP API (Bottle)."""
