"""Stores: features on disk with a manifest; written atomically, refused when stale."""
