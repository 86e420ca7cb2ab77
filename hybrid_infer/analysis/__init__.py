"""Measuring partitions: timing, partition comparison, automatic choice, layer-wise diff."""
