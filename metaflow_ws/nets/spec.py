"""One frozen description of an MLP architecture and the batched parameter representation built on it.

A *batch of networks* is a dict ``{name: Tensor[B, ...]}`` whose keys and per-network shapes are those of
:class:`MLP`'s ``state_dict`` (``layers.0.weight``, ``layers.0.bias``, ...). It is what
:func:`torch.func.functional_call` accepts under :func:`torch.func.vmap`, and :meth:`NetworkSpec.flatten` gives
the cheap ``[B, D]`` view used by optimizers, flows and distances.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "NetworkSpec",
    "Params",
    "activation_fn",
    "index_params",
]

Params = dict[str, Tensor]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": torch.relu,
    "leaky_relu": nn.functional.leaky_relu,
    "tanh": torch.tanh,
    "gelu": nn.functional.gelu,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}
#: Activations with f(c·x) = c·f(x) for c > 0: the ones whose networks have the ReLU scaling symmetry.
POSITIVELY_HOMOGENEOUS = frozenset({"relu", "leaky_relu", "identity"})


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The elementwise activation called ``name``; raises with the valid names for an unknown one."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


class MLP(nn.Module):
    """Plain MLP ``Linear → act → ... → Linear`` whose state-dict keys define the batched representation."""

    def __init__(self, widths: Iterable[int], activation: str = "relu") -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        self.widths = widths
        self.activation = activation
        self._act = activation_fn(activation)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = self._act(x)
        return x


@dataclass(frozen=True)
class NetworkSpec:
    """Architecture of a fully connected network: layer widths ``(in, h1, ..., out)`` and hidden activation.

    Parameter order (used by :meth:`flatten`) is ``layers.0.weight, layers.0.bias, layers.1.weight, ...``;
    weights are ``(fan_out, fan_in)`` as in :class:`torch.nn.Linear`.
    """

    widths: tuple[int, ...]
    activation: str = "relu"

    def __post_init__(self) -> None:
        widths = tuple(int(w) for w in self.widths)
        if len(widths) < 2 or any(w <= 0 for w in widths):
            raise ValueError(f"widths must hold at least two positive sizes (in, ..., out); got {self.widths}")
        object.__setattr__(self, "widths", widths)
        activation_fn(self.activation)

    # ----------------------------------------------------------------------------------------- structure
    @property
    def num_layers(self) -> int:
        """Number of linear layers."""
        return len(self.widths) - 1

    @property
    def in_features(self) -> int:
        return self.widths[0]

    @property
    def out_features(self) -> int:
        return self.widths[-1]

    @property
    def hidden_widths(self) -> tuple[int, ...]:
        return self.widths[1:-1]

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-network parameter shapes in flattening order."""
        out: dict[str, tuple[int, ...]] = {}
        for i, (a, b) in enumerate(zip(self.widths[:-1], self.widths[1:])):
            out[f"layers.{i}.weight"] = (b, a)
            out[f"layers.{i}.bias"] = (b,)
        return out

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    @cached_property
    def num_params(self) -> int:
        """D, the length of one flattened network."""
        return sum(math.prod(s) for s in self.shapes.values())

    @cached_property
    def offsets(self) -> dict[str, tuple[int, int]]:
        """``name -> (start, stop)`` of each parameter in the flat vector."""
        out, pos = {}, 0
        for name, shape in self.shapes.items():
            n = math.prod(shape)
            out[name] = (pos, pos + n)
            pos += n
        return out

    @property
    def positively_homogeneous(self) -> bool:
        """True when hidden neurons have the positive scaling symmetry (ReLU, leaky ReLU, identity)."""
        return self.activation in POSITIVELY_HOMOGENEOUS

    def to_dict(self) -> dict:
        return {"widths": list(self.widths), "activation": self.activation}

    @classmethod
    def from_dict(cls, d: Mapping) -> NetworkSpec:
        try:
            return cls(tuple(d["widths"]), d.get("activation", "relu"))
        except (KeyError, TypeError) as e:
            raise ValueError(f"a network spec needs 'widths' (list of ints) and 'activation'; got {d!r}") from e

    # ----------------------------------------------------------------------------------- batched params
    def batch_size(self, params: Mapping[str, Tensor]) -> int:
        """B of a batched parameter dict, after checking every key and shape against this spec."""
        self.check(params)
        return next(iter(params.values())).shape[0]

    def check(self, params: Mapping[str, Tensor], batched: bool = True) -> None:
        """Raise ``ValueError`` naming the first missing/unexpected key or wrong shape."""
        missing = [n for n in self.shapes if n not in params]
        extra = [n for n in params if n not in self.shapes]
        if missing or extra:
            raise ValueError(
                f"parameters do not match architecture {self.describe()}: missing {missing}, unexpected {extra}"
            )
        lead = None
        for name, shape in self.shapes.items():
            t = params[name]
            got = tuple(t.shape[1:]) if batched else tuple(t.shape)
            if got != shape or (batched and t.dim() != len(shape) + 1):
                want = ("B, " if batched else "") + ", ".join(map(str, shape))
                raise ValueError(
                    f"parameter {name!r} should have shape ({want}) for architecture {self.describe()}; "
                    f"got {tuple(t.shape)}"
                )
            if batched:
                if lead is None:
                    lead = t.shape[0]
                elif t.shape[0] != lead:
                    raise ValueError(f"batch sizes differ across parameters: {name!r} has {t.shape[0]}, not {lead}")

    def flatten(self, params: Mapping[str, Tensor]) -> Tensor:
        """``{name: [B, *shape]}`` → ``[B, D]`` (concatenated in :attr:`shapes` order)."""
        b = self.batch_size(params)
        return torch.cat([params[n].reshape(b, -1) for n in self.shapes], dim=1)

    def unflatten(self, flat: Tensor) -> Params:
        """``[B, D]`` (or ``[D]``) → ``{name: [B, *shape]}`` as views of ``flat``."""
        single = flat.dim() == 1
        if single:
            flat = flat.unsqueeze(0)
        if flat.dim() != 2 or flat.shape[1] != self.num_params:
            raise ValueError(
                f"flat weights for {self.describe()} must have shape (B, {self.num_params}); got {tuple(flat.shape)}"
            )
        out = {
            n: flat[:, a:b].reshape(flat.shape[0], *self.shapes[n]) for n, (a, b) in self.offsets.items()
        }
        return {n: t[0] for n, t in out.items()} if single else out

    def weights(self, params: Mapping[str, Tensor]) -> list[Tensor]:
        return [params[f"layers.{i}.weight"] for i in range(self.num_layers)]

    def biases(self, params: Mapping[str, Tensor]) -> list[Tensor]:
        return [params[f"layers.{i}.bias"] for i in range(self.num_layers)]

    def init(
        self,
        batch: int,
        *,
        scheme: str = "normal",
        std: float = 0.1,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> Params:
        """Draw ``batch`` networks. ``scheme``: ``normal`` (N(0, std²) for all parameters), ``kaiming_uniform``
        (PyTorch's default ``nn.Linear`` init), ``zeros``."""
        out: Params = {}
        for name, shape in self.shapes.items():
            size = (batch, *shape)
            if scheme == "normal":
                t = torch.randn(size, generator=generator, dtype=dtype) * std
            elif scheme == "kaiming_uniform":
                fan_in = self.widths[int(name.split(".")[1])]
                bound = 1.0 / math.sqrt(fan_in)
                t = (torch.rand(size, generator=generator, dtype=dtype) * 2 - 1) * bound
            elif scheme == "zeros":
                t = torch.zeros(size, dtype=dtype)
            else:
                raise ValueError(f"unknown init scheme {scheme!r}; expected 'normal', 'kaiming_uniform' or 'zeros'")
            out[name] = t.to(device)
        return out

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Forward pass of ONE network (unbatched ``params``): ``x (N, in) → (N, out)``. Pure, vmap-able."""
        act = activation_fn(self.activation)
        h = x
        for i in range(self.num_layers):
            h = torch.nn.functional.linear(h, params[f"layers.{i}.weight"], params[f"layers.{i}.bias"])
            if i < self.num_layers - 1:
                h = act(h)
        return h

    def batched_forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Forward pass of B networks with ``torch.func.vmap``.

        ``x`` is ``(N, in)`` (the same inputs for every network) or ``(B, N, in)`` (one input batch per network);
        returns ``(B, N, out)``.
        """
        if x.dim() == 2:
            in_dims = (0, None)
        elif x.dim() == 3:
            in_dims = (0, 0)
        else:
            raise ValueError(f"inputs must be (N, {self.in_features}) or (B, N, {self.in_features}); got {tuple(x.shape)}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"inputs must have {self.in_features} features for {self.describe()}; got {x.shape[-1]}")
        return torch.func.vmap(self.forward, in_dims=in_dims)(dict(params), x)

    # ------------------------------------------------------------------------------------------ modules
    def module(self, device: torch.device | str | None = None) -> MLP:
        """A fresh :class:`MLP` of this architecture (``device='meta'`` gives a parameter-free skeleton)."""
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return MLP(self.widths, self.activation)

    def state_dict_of(self, params: Mapping[str, Tensor], index: int) -> dict[str, Tensor]:
        """The ``index``-th network of a batch as an :class:`MLP` state dict (cloned tensors)."""
        b = self.batch_size(params)
        if not -b <= index < b:
            raise IndexError(f"network index {index} out of range for a batch of {b}")
        return {n: params[n][index].detach().clone() for n in self.shapes}

    def to_state_dicts(self, params: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        return [self.state_dict_of(params, i) for i in range(self.batch_size(params))]

    def to_modules(self, params: Mapping[str, Tensor]) -> list[MLP]:
        """One :class:`MLP` per network of the batch."""
        mods = []
        for sd in self.to_state_dicts(params):
            m = self.module(device=next(iter(sd.values())).device)
            m.load_state_dict(sd)
            mods.append(m.to(next(iter(sd.values())).dtype))
        return mods

    def from_modules(self, modules: Iterable[nn.Module]) -> Params:
        """Stack the linear layers of modules of this architecture (any module whose ``nn.Linear`` layers, in
        registration order, have this spec's shapes: :class:`MLP`, ``nn.Sequential``, ...)."""
        return self.stack([self.params_of_module(m) for m in modules])

    def params_of_module(self, module: nn.Module) -> dict[str, Tensor]:
        """Unbatched parameter dict of one module, matched by the order of its ``nn.Linear`` layers."""
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        shapes = [(m.out_features, m.in_features) for m in linears]
        want = [self.shapes[f"layers.{i}.weight"] for i in range(self.num_layers)]
        if shapes != want or any(m.bias is None for m in linears):
            raise ValueError(
                f"module's linear layers {shapes} (biases required) do not match architecture {self.describe()} "
                f"which needs {want}"
            )
        out = {}
        for i, m in enumerate(linears):
            out[f"layers.{i}.weight"] = m.weight.detach().clone()
            out[f"layers.{i}.bias"] = m.bias.detach().clone()
        return out

    def load_into(self, module: nn.Module, params: Mapping[str, Tensor]) -> nn.Module:
        """Copy one network's (unbatched) parameters into ``module``'s linear layers, in place."""
        self.check(params, batched=False)
        self.params_of_module(module)  # validates the architecture
        linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for i, m in enumerate(linears):
                m.weight.copy_(params[f"layers.{i}.weight"])
                m.bias.copy_(params[f"layers.{i}.bias"])
        return module

    @staticmethod
    def stack(dicts: Iterable[Mapping[str, Tensor]]) -> Params:
        dicts = list(dicts)
        if not dicts:
            raise ValueError("cannot stack an empty list of parameter dicts")
        return {n: torch.stack([d[n] for d in dicts]) for n in dicts[0]}

    def describe(self) -> str:
        return f"MLP {'-'.join(map(str, self.widths))} ({self.activation})"


def index_params(params: Mapping[str, Tensor], index: Tensor | slice | int) -> Params:
    """Select networks of a batch: ``{n: t[index]}``."""
    return {n: t[index] for n, t in params.items()}
