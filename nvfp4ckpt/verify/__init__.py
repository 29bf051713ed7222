"""Checking a converted checkpoint: structure, layout (bytes against the source) and numerics."""
