"""Pieces every stage shares: the user-facing error type, the CLI wrapper, atomic file writes."""
