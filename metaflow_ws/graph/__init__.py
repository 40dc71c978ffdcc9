"""The sparse neural graph of a network: neurons as nodes, existing weights as edges (O(N + E))."""

from metaflow_ws.graph.neural_graph import GraphFeatures, NeuralGraph, neural_graph

__all__ = ["GraphFeatures", "NeuralGraph", "neural_graph"]
