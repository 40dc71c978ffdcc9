"""Weight-space symmetries of MLPs: neuron permutations, alignment to a reference, ReLU scale canonicalization
and loss barriers.

- :mod:`~metaflow_ws.symmetry.permutation`: apply / draw / invert batched neuron permutations;
- :mod:`~metaflow_ws.symmetry.align`: weight matching (Git Re-Basin) and activation matching to a reference;
- :mod:`~metaflow_ws.symmetry.scaling`: positive rescaling, :func:`canonicalize`, canonical coordinates;
- :mod:`~metaflow_ws.symmetry.barrier`: loss barriers along linear paths between networks.
"""

from metaflow_ws.symmetry.align import (
    Alignment,
    activation_matching,
    align,
    align_zoo,
    hidden_activations,
    solve_assignments,
    weight_matching,
)
from metaflow_ws.symmetry.barrier import BarrierResult, ZooBarrierResult, loss_barrier, random_pairs, zoo_barrier
from metaflow_ws.symmetry.permutation import (
    Perms,
    apply_permutation,
    compose_permutations,
    identity_permutation,
    invert_permutation,
    random_permutation,
)
from metaflow_ws.symmetry.scaling import (
    canonical_dim,
    canonicalize,
    from_canonical,
    random_scales,
    rescale_neurons,
    to_canonical,
)

__all__ = [
    "Alignment",
    "BarrierResult",
    "Perms",
    "ZooBarrierResult",
    "activation_matching",
    "align",
    "align_zoo",
    "apply_permutation",
    "canonical_dim",
    "canonicalize",
    "compose_permutations",
    "from_canonical",
    "hidden_activations",
    "identity_permutation",
    "invert_permutation",
    "loss_barrier",
    "random_pairs",
    "random_permutation",
    "random_scales",
    "rescale_neurons",
    "solve_assignments",
    "to_canonical",
    "weight_matching",
    "zoo_barrier",
]
