"""Function-preserving growth of MLPs (Net2Net; Chen, Goodfellow & Shlens 2016), batched over networks.

:func:`grow` turns networks of one architecture into networks of a wider and/or deeper one that compute exactly
the same function: the honest baseline for architecture transfer (a flow that samples a deeper network should beat
growing its own samples), and a way to start a bigger model from a flow trained on a smaller one
(``init_(module, flow, width_transfer="grow")``).

- **Wider** (Net2WiderNet): every new neuron of a hidden layer copies the incoming weights and bias of a randomly
  chosen existing neuron; each copy of a neuron takes a random positive share of that neuron's outgoing weights
  (shares sum to one), so the next layer sees the same sum. Unequal shares make the copies' gradients differ, so
  training separates them (equal shares would keep copies identical forever).
- **Deeper** (Net2DeeperNet): new hidden layers are identity layers (``W = I``, ``b = 0``) inserted after the last
  hidden layer. ``relu(I·a) = a`` because ``a = relu(z) ≥ 0``, so this is exact for ReLU (and identity)
  networks only; other activations raise. A new layer starts as wide as the layer before it and is then widened.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from metaflow_ws.nets.spec import NetworkSpec, Params

__all__ = ["can_grow", "check_growth", "grow"]

#: activations with act(act(z)) = act(z), for which an inserted identity layer keeps the function
_IDEMPOTENT = frozenset({"relu", "identity"})


def check_growth(spec: NetworkSpec, widths: Sequence[int]) -> None:
    """Raise ``ValueError`` (naming the problem) unless :func:`grow` can take ``spec`` to ``widths``."""
    widths = tuple(int(w) for w in widths)
    target = f"{'-'.join(map(str, widths))}"
    if (widths[0], widths[-1]) != (spec.in_features, spec.out_features):
        raise ValueError(f"growing {spec.describe()} keeps its {spec.in_features} inputs and {spec.out_features} "
                         f"outputs; got widths {target}")
    if len(widths) < len(spec.widths):
        raise ValueError(f"grow only adds layers and neurons: {target} has fewer layers than {spec.describe()} "
                         "(removing a layer does not keep the function)")
    own = spec.hidden_widths
    if len(widths) > len(spec.widths):
        if not own:
            raise ValueError(f"{spec.describe()} has no hidden layer to continue with identity layers")
        if spec.activation not in _IDEMPOTENT:
            raise ValueError(f"deepening keeps the function only for relu or identity networks (an inserted identity "
                             f"layer needs act(act(z)) = act(z)); {spec.describe()} uses {spec.activation}")
    # hidden layer i of the target continues hidden layer i of the source; extra layers start at the last one's width
    base = (*own, *[own[-1]] * (len(widths) - len(spec.widths))) if own else ()
    narrower = [i + 1 for i, (b, w) in enumerate(zip(base, widths[1:-1])) if w < b]
    if narrower:
        raise ValueError(f"grow only adds neurons: hidden layer(s) {narrower} of {target} are narrower than "
                         f"{spec.describe()}'s ({'-'.join(map(str, (widths[0], *base, widths[-1])))} at least)")


def can_grow(spec: NetworkSpec, widths: Sequence[int]) -> bool:
    """Whether :func:`grow` can turn networks of ``spec`` into networks of ``widths`` (the same function)."""
    try:
        check_growth(spec, widths)
    except ValueError:
        return False
    return True


def _deepen(weights: list[Tensor], biases: list[Tensor], extra: int) -> None:
    """Insert ``extra`` identity layers before the output layer (in place on the lists)."""
    w_prev = weights[-2]
    b, n = w_prev.shape[0], w_prev.shape[1]
    eye = torch.eye(n, dtype=w_prev.dtype, device=w_prev.device).expand(b, n, n)
    for _ in range(extra):
        weights.insert(len(weights) - 1, eye.clone())
        biases.insert(len(biases) - 1, w_prev.new_zeros(b, n))


def _widen(weights: list[Tensor], biases: list[Tensor], layer: int, width: int, generator: torch.Generator | None
           ) -> None:
    """Widen the output neurons of linear layer ``layer`` (a hidden layer) to ``width`` (in place on the lists)."""
    w_in, b_in, w_out = weights[layer], biases[layer], weights[layer + 1]
    batch, n = b_in.shape
    if width == n:
        return
    dev = w_in.device
    g_dev = generator.device if generator is not None else torch.device("cpu")  # draw where the generator lives
    extra = torch.randint(0, n, (batch, width - n), generator=generator, device=g_dev).to(dev)
    src = torch.cat([torch.arange(n, device=dev).expand(batch, n), extra], 1)  # [B, width]: neuron each copies
    share = torch.rand(batch, width, generator=generator, dtype=w_in.dtype, device=g_dev).to(dev) + 0.5  # U(0.5, 1.5)
    total = torch.zeros(batch, n, dtype=w_in.dtype, device=dev).scatter_add_(1, src, share)
    share = share / total.gather(1, src)  # each neuron's copies' shares sum to one
    weights[layer] = w_in.gather(1, src.unsqueeze(-1).expand(-1, -1, w_in.shape[-1]))
    biases[layer] = b_in.gather(1, src)
    weights[layer + 1] = w_out.gather(2, src.unsqueeze(1).expand(-1, w_out.shape[1], -1)) * share.unsqueeze(1)


def grow(spec: NetworkSpec, params: Mapping[str, Tensor], widths: Sequence[int], *,
         generator: torch.Generator | None = None) -> Params:
    """Networks of ``NetworkSpec(widths, spec.activation)`` computing exactly the functions of ``params``.

    Args:
        spec: architecture of ``params``.
        params: a batch of networks ``{name: [B, ...]}`` of ``spec``.
        widths: the target architecture, ``(in, h1, ..., out)``: the same inputs and outputs, at least as many
            layers, every hidden layer at least as wide as the one it continues (hidden layer ``i`` continues
            ``spec``'s hidden layer ``i``; layers beyond ``spec``'s depth are identity layers continuing its last
            hidden layer, so they must be at least that wide).
        generator: source of the random neuron copies and output-weight shares.

    Returns the grown batch in ``NetworkSpec(widths, spec.activation)``'s layout. Raises ``ValueError`` for a
    target that is smaller anywhere, has other input/output sizes, or is deeper when the activation is not
    relu / identity.
    """
    widths = tuple(int(w) for w in widths)
    new = NetworkSpec(widths, spec.activation)
    spec.check(params)
    check_growth(spec, widths)
    weights, biases = list(spec.weights(params)), list(spec.biases(params))
    if len(widths) > len(spec.widths):
        _deepen(weights, biases, len(widths) - len(spec.widths))
    for layer, w in enumerate(widths[1:-1]):
        _widen(weights, biases, layer, w, generator)
    out: Params = {}
    for i, (w, b) in enumerate(zip(weights, biases)):
        out[f"layers.{i}.weight"], out[f"layers.{i}.bias"] = w.contiguous(), b.contiguous()
    new.check(out)
    return out
