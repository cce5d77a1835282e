"""Sekisho pki package."""
