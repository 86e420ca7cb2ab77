"""The model as a networkx graph of layers joined by blob values."""
