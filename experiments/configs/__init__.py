"""Experiment configurations (ml_collections)."""
