"""Geometry of weight coordinates: Euclidean space, unit spheres and their product (batched, loop-free)."""

from metaflow_ws.geometry.manifolds import (
    T_EPS,
    Block,
    Euclidean,
    Manifold,
    ProductManifold,
    Sphere,
    euclidean_for,
    product_manifold_for,
)

__all__ = [
    "T_EPS",
    "Block",
    "Euclidean",
    "Manifold",
    "ProductManifold",
    "Sphere",
    "euclidean_for",
    "product_manifold_for",
]
