"""Sekisho gateway package."""
