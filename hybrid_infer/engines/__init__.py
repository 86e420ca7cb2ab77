"""Engines run one segment each behind the same small interface (see ``base``)."""
