"""Which layers TensorRT can take (capability) and how the graph is cut (partitioner)."""
