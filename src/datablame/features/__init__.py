"""Features: what is computed once per training row and reused by every query."""
