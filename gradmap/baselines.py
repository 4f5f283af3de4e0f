"""Baseline layer-importance scores (kept for backward compatibility; the methods live in :mod:`gradmap.methods`)."""

from .methods.shortgpt import block_influence

__all__ = ["block_influence"]
