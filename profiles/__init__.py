"""Precision profiles shipped with edge3d (TOML files beside this module)."""
