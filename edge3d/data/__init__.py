"""Synthetic data sources (numpy only, no torch)."""
