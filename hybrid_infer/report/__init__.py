"""Showing a partition to people (text, picture) and programs (JSON)."""
