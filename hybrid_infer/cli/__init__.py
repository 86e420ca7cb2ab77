"""The ``hybrid-infer`` command: one sub-command per module in this package."""
