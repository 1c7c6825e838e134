"""Shared test helpers (generated data sets and the like)."""
