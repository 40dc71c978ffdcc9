"""A weight-space flow: coordinates + geometry + Relational Transformer vector field, saved as safetensors + JSON.

The network predicts x1 (the clean weights) from (x_t, t); the velocity is derived from the prediction on the
path's geometry: ``(x̂1 − x_t)/(1 − t)`` (Euclidean) or ``log_{x_t}(x̂1)/(1 − t)`` (geometric). Inputs and
outputs are scaled per parameter block by fixed statistics of the training data (:attr:`scale`), so that layers
of very different magnitude (e.g. unit rows with 784 entries) reach the model on a common scale.

Architecture transfer: :meth:`WeightFlow.for_spec` gives a flow for another hidden width or depth (same
input/output sizes) that shares this flow's vector field; see its docstring for the coordinates and scales.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from metaflow_ws.flows.coordinates import FLOWS, FlowKind, WeightCoordinates
from metaflow_ws.io.atomic import atomic_write_bytes, atomic_write_json
from metaflow_ws.nets.spec import NetworkSpec

if TYPE_CHECKING:
    from metaflow_ws.io import Zoo
    from metaflow_ws.models import SetEncoder

__all__ = ["FlowConfig", "WeightFlow", "FlowFormatError", "PRECISIONS", "default_prior_std"]


def default_prior_std(zoo: Zoo) -> float:
    """σ of the prior ``N(0, σ²I)`` for a flow over ``zoo``: a synthetic task's ``[synthetic] prior_std`` (the
    thesis's §4.1 toy fixes the prior, not an init), otherwise the scale the zoo's networks were initialized at
    (recipe ``init_std``, 0.1 when the zoo does not record one)."""
    from metaflow_ws.errors import UnknownTaskError
    from metaflow_ws.tasks import get_task

    try:
        synthetic = get_task(zoo.task).synthetic
    except UnknownTaskError:  # a zoo of an unregistered task still trains with its recipe's scale
        synthetic = None
    if synthetic is not None:
        return float(synthetic.prior_std)
    return float(zoo.recipe.get("init_std", 0.1))


#: training precisions of the vector field (``TrainConfig.precision``, ``--precision``)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def _precision_dtype(precision: torch.dtype | str | None) -> torch.dtype | None:
    """``"fp32"``/None → None (no autocast), ``"bf16"``/``torch.bfloat16`` → ``torch.bfloat16``."""
    if precision is None or isinstance(precision, torch.dtype):
        if precision not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"unsupported autocast dtype {precision}; use torch.bfloat16 (or None for float32)")
        return None if precision == torch.float32 else precision
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    return PRECISIONS[precision]


CONFIG_NAME = "config.json"
WEIGHTS_NAME = "flow.safetensors"
#: default path noise σ of :class:`FlowConfig` (see ``FlowConfig.sigma``); plain conditional flow matching is 0
SIGMA = 0.3


def check_path_noise(sigma: float, name: str = "path noise sigma") -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``sigma`` is a valid path noise (finite, ≥ 0)."""
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"{name} must be a finite number ≥ 0 (0 = plain flow matching); got {sigma}")


class FlowFormatError(ValueError):
    """A flow folder that is missing, corrupt or for another architecture."""


@dataclass(frozen=True)
class FlowConfig:
    """Everything needed to rebuild a flow (stored as ``config.json``)."""

    flow: FlowKind
    widths: tuple[int, ...]
    activation: str = "relu"
    task: str = ""
    prior_std: float = 0.316
    d_model: int = 32
    num_layers: int = 3
    heads: int = 1
    #: width of the field's edge features (None: ``d_model``). Edge work dominates the cost (E ≫ N): the thesis's
    #: d_E = 32 at d_model = 64 trains ≈ 1.4× faster than d_E = 64 (``bench_vector_field.py --d-edge 32``)
    d_edge: int | None = None
    cond_dim: int = 0
    #: path noise (``train --path-noise``): training moves x_t by σ times each block's data RMS in a random
    #: direction and projects it back onto the path manifold, while the target stays x1, so the field learns to
    #: pull points off the training paths back onto them; that keeps the sampler's trajectories from drifting.
    #: On ``breast_cancer`` (Geometric, d=32 × 3, 3,000 steps) σ = 0 → 0.3 takes the samples from 0.952 / NLL 0.153
    #: to 0.973 / 0.082 with less functional diversity (0.024 → 0.014; the trained networks' own: 0.010)
    sigma: float = SIGMA
    aligned: bool = False
    #: task-conditioned flows: a support-set encoder (``SetEncoderConfig`` fields except ``cond_dim``, e.g.
    #: ``{"x_dim": 1, "y_dim": 1}``) whose embedding, of size ``cond_dim``, conditions the vector field.
    encoder: dict[str, Any] | None = None
    #: predict x1 as ``c_skip(t)·x_t + c_out(t)·F(x_t, t)`` (EDM-style preconditioning, per block from the prior's
    #: and the data's RMS) and train F with unit weight: exact near t = 1, where the plain parameterization has
    #: to rebuild x_t through the network. It helps the task-conditioned few-shot flow (sinusoid: query MSE 2.9
    #: vs 4.0 before fine-tuning) and hurts the unconditional breast_cancer flows at 1,000 steps (Euclidean test
    #: accuracy 0.76 vs 0.91), so it is off by default.
    precondition: bool = False
    #: feed one fixed network, the anchor (``WeightFlow.set_anchor``; ``train_flow`` sets it), to the vector field
    #: next to x_t, so that the flow can model a zoo that lives in one permutation basin, such as a family zoo
    #: trained from one shared initialization (see ``RelationalTransformer(anchor=True)``)
    anchor: bool = False
    #: architecture the vector field was built for, when it is not ``widths``: a flow moved to another depth by
    #: :meth:`WeightFlow.for_spec` keeps its field's per-layer parameters (None: ``widths``)
    field_widths: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.flow not in FLOWS:
            raise ValueError(f"unknown flow {self.flow!r}; expected one of {list(FLOWS)}")
        check_path_noise(self.sigma)
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.field_widths is not None:
            object.__setattr__(self, "field_widths", tuple(int(w) for w in self.field_widths))
        if self.encoder is not None:
            if self.cond_dim < 1:
                raise ValueError("a flow with a support-set encoder needs cond_dim ≥ 1 (the embedding size)")
            if "cond_dim" in self.encoder:
                raise ValueError("give the embedding size as FlowConfig.cond_dim, not inside encoder")
            object.__setattr__(self, "encoder", dict(self.encoder))

    @property
    def spec(self) -> NetworkSpec:
        return NetworkSpec(self.widths, self.activation)

    @property
    def field_spec(self) -> NetworkSpec:
        """Architecture the vector field's per-layer parameters were built for (usually :attr:`spec`)."""
        return NetworkSpec(self.field_widths, self.activation) if self.field_widths is not None else self.spec

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self) | {"widths": list(self.widths)}
        return d | {"field_widths": list(self.field_widths)} if self.field_widths is not None else d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FlowConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FlowFormatError(f"flow config has unknown keys {unknown}")
        return cls(**d)


class WeightFlow(nn.Module):
    """Flow-matching model over the weights of networks of one architecture."""

    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        from metaflow_ws.models import RelationalTransformer, SetEncoder, SetEncoderConfig

        self.config = config
        #: what ``save_pretrained(extra=...)`` stored beside the config (training settings, the zoo's task and
        #: split ``zoo_data_seed``, ...); filled by :func:`train_flow` and :meth:`from_pretrained`
        self.meta: dict[str, Any] = {}
        self.coords = WeightCoordinates(config.spec, config.flow)
        self.field = RelationalTransformer(
            config.field_spec,
            d_model=config.d_model,
            num_layers=config.num_layers,
            heads=config.heads,
            d_edge=config.d_edge,
            n_globals=self.coords.n_globals,
            cond_dim=config.cond_dim,
            anchor=config.anchor,
        )
        self.encoder: SetEncoder | None = None
        if config.encoder is not None:
            self.encoder = SetEncoder(SetEncoderConfig(**config.encoder, cond_dim=config.cond_dim))
        self.register_buffer("scale", torch.ones(self.coords.dim))
        if config.anchor:
            self.register_buffer("anchor", torch.zeros(self.coords.dim))
        if config.precondition:
            #: RMS of prior draws in scaled units (per block); the data's is 1 by construction of ``scale``
            self.register_buffer("prior_rms", torch.ones(self.coords.dim))
        self.data_manifold = self.coords.data_manifold
        self.path_manifold = self.coords.path_manifold

    # ------------------------------------------------------------------------------------------ basics
    @contextlib.contextmanager
    def compiled(self, enabled: bool = True, **compile_kwargs: Any) -> Iterator[WeightFlow]:
        """Inside the block, the vector field runs through ``torch.compile`` (Inductor; CPU needs a C++ compiler).

        Fused kernels make a training step 1.3-1.5× (d = 64 × 5 layers, breast_cancer and digits graphs) to
        2.4× (a 40-100-100-10 graph, 15,000 edges) faster on CPU (``benchmarks/bench_vector_field.py --compile``), after
        a one-off compilation of about a minute per input shape. The compiled field runs without activation
        checkpointing, whose recomputation costs more than Inductor saves (that graph, batch 32: 1.6 GB peak
        compiled vs 1.1 GB checkpointed and 1.9 GB plain). The flow and its ``state_dict`` are unchanged; on
        exit the eager field is back. ``compile_kwargs`` go to ``torch.compile`` (default ``dynamic=False``).
        """
        if not enabled:
            yield self
            return
        field = self.field
        saved = field.checkpoint
        field.checkpoint = False
        # a plain attribute (not a registered submodule): state_dict keys and parameters stay the field's own
        self.__dict__["_compiled_field"] = torch.compile(field, **({"dynamic": False} | compile_kwargs))
        try:
            yield self
        except torch._dynamo.exc.BackendCompilerFailed as e:
            raise RuntimeError(
                f"torch.compile could not build the vector field ({str(e).strip().splitlines()[0][:300]}); on CPU "
                "it needs a working C++ compiler (e.g. `apt install g++`, or set CXX), on CUDA triton. "
                "Train without compilation instead (drop --compile / TrainConfig(compile=False))"
            ) from e
        finally:
            self.__dict__.pop("_compiled_field", None)
            field.checkpoint = saved

    @contextlib.contextmanager
    def autocast(self, dtype: torch.dtype | str | None = torch.bfloat16) -> Iterator[WeightFlow]:
        """Inside the block, the vector field runs in mixed precision (``torch.autocast`` with ``dtype``).

        Only the field is autocast: its matrix products run in ``dtype`` while parameters, optimizer state, the
        geometry (interpolation, exponential map, projection) and the loss stay in float32 (the field's output
        is cast back). bfloat16 needs no loss scaling; on CPUs with AMX / AVX512-BF16 (and on GPUs) it makes a
        compiled training step about 1.4× faster (``benchmarks/bench_vector_field.py --compile --bf16``);
        elsewhere it is emulated and slower. ``dtype=None`` (or ``"fp32"``) leaves the field in float32.
        """
        dtype = _precision_dtype(dtype)
        if dtype is None:
            yield self
            return
        self.__dict__["_autocast_dtype"] = dtype
        try:
            yield self
        finally:
            self.__dict__.pop("_autocast_dtype", None)

    @property
    def spec(self) -> NetworkSpec:
        return self.config.spec

    @property
    def dim(self) -> int:
        return self.coords.dim

    def set_scale_from(self, x1: Tensor, eps: float = 1e-6) -> None:
        """Per-parameter-block RMS of training coordinates ``x1: [N, dim]`` (one scalar per block)."""
        self.scale.copy_(block_rms(self.spec, x1, eps).to(self.scale))
        self._set_prior_rms()

    @torch.no_grad()
    def _set_prior_rms(self, n: int = 512) -> None:
        """Per-block RMS of ``n`` prior draws divided by ``scale`` (fixed seed; the caller's RNG is untouched)."""
        if not self.config.precondition:
            return
        x0 = self.sample_prior(n, generator=torch.Generator().manual_seed(0)) / self.scale
        self.prior_rms.copy_(block_rms(self.spec, x0))

    def preconditioning(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(c_skip, c_out)``, each ``[B, dim]``, of ``x̂1/scale = c_skip·x_t/scale + c_out·F``.

        For x_t = (1−t)·x0 + t·x1 with x0 of RMS s0 and x1 of RMS 1 (per block, scaled units), the best linear
        estimate of x1 from x_t has ``c_skip = t / ((1−t)²s0² + t²)``, and ``c_out = (1−t)·s0 / sqrt(...)`` is
        the RMS of what remains, so F's target has unit size at every t (Karras et al. 2022, for this path).
        Without preconditioning: ``(0, 1)``.
        """
        t = t.to(self.scale.dtype)[:, None]
        if not self.config.precondition:
            return torch.zeros_like(t).expand(-1, self.dim), torch.ones_like(t).expand(-1, self.dim)
        s0 = self.prior_rms
        var = ((1 - t) * s0) ** 2 + t**2
        return t / var, (1 - t) * s0 / var.sqrt()

    def predict_x1(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """x̂1 on the data manifold. ``x: [B, dim]``, ``t: [B]``, ``cond: [B, cond_dim]`` → ``[B, dim]``."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"flow coordinates must be (B, {self.dim}) for {self.spec.describe()}; got {tuple(x.shape)}")
        z = x / self.scale
        anchor = self.anchor / self.scale if self.config.anchor else None
        field = self.__dict__.get("_compiled_field", self.field)
        amp = self.__dict__.get("_autocast_dtype")
        if amp is None:
            out = field(z, t, cond, spec=self.spec, anchor=anchor)
        else:
            with torch.autocast(z.device.type, dtype=amp):
                out = field(z, t, cond, spec=self.spec, anchor=anchor)
            out = out.to(z.dtype)
        if self.config.precondition:
            c_skip, c_out = self.preconditioning(t)
            out = c_skip * z + c_out * out
        return self.data_manifold.project(out * self.scale)

    @torch.no_grad()
    def set_anchor(self, network: dict[str, Tensor] | Tensor) -> None:
        """Set the anchor of an anchored flow: one network ``{name: [1, ...]}`` (or ``{name: [...]}``) or its
        flow coordinates ``(dim,)``."""
        if not self.config.anchor:
            raise ValueError("this flow has no anchor; build it with FlowConfig(anchor=True)")
        if isinstance(network, Tensor):
            coords = network.reshape(-1)
        else:
            one = {k: (v if v.dim() == len(self.spec.shapes[k]) + 1 else v.unsqueeze(0)) for k, v in network.items()}
            coords = self.encode({k: v.to(self.scale) for k, v in one.items()}).reshape(-1)
        if coords.shape != (self.dim,):
            raise ValueError(f"the anchor must be one network of {self.spec.describe()} ({self.dim} coordinates); "
                             f"got {tuple(coords.shape)}")
        if not torch.isfinite(coords).all():
            raise ValueError("the anchor network has NaN/inf weights")
        self.anchor.copy_(coords.to(self.anchor))

    def embed(self, support_x: Tensor, support_y: Tensor) -> Tensor:
        """Task embedding ``[B, cond_dim]`` of support sets ``x: [B, K, x_dim]``, ``y: [B, K, y_dim]``."""
        if self.encoder is None:
            raise ValueError("this flow is not task-conditioned (no support-set encoder); train one with "
                             "FlowConfig(cond_dim=..., encoder={...}) on a family zoo")
        return self.encoder(support_x, support_y)

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """Velocity at (x, t) derived from the x1 prediction, in the path's geometry."""
        return self.path_manifold.velocity(x, self.predict_x1(x, t, cond), t)

    def sample_prior(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        p = next(self.parameters())
        return self.coords.sample_prior(n, self.config.prior_std, generator=generator, dtype=p.dtype, device=p.device)

    def decode(self, x: Tensor) -> dict[str, Tensor]:
        return self.coords.decode(x)

    def encode(self, params: dict[str, Tensor]) -> Tensor:
        return self.coords.encode(params)

    def check_spec(self, spec: NetworkSpec, what: str = "task") -> None:
        """Raise when ``spec`` is not this flow's architecture."""
        if spec != self.spec:
            hint = "train a flow on a zoo of that architecture"
            if (spec.in_features, spec.out_features, spec.activation) == (
                    self.spec.in_features, self.spec.out_features, self.spec.activation):
                hint += " (or transfer this one to the new architecture with flow.for_spec(spec))"
            raise ValueError(
                f"this {self.config.flow} flow generates {self.spec.describe()} networks but the {what} uses "
                f"{spec.describe()}; {hint}"
            )

    def for_spec(self, spec: NetworkSpec) -> WeightFlow:
        """This flow for networks of another architecture (architecture transfer); ``self`` when ``spec`` is
        this flow's own.

        The returned flow shares this flow's vector field and support-set encoder (same parameters; the field
        runs on the graph topology of ``spec``). Input/output sizes and activation must match; hidden widths
        may change freely, depth where the field has layers to reuse (a deeper network's extra interior layers
        take the embeddings of the interior layer at the same relative depth, so the source needs two or more
        hidden layers; see :func:`~metaflow_ws.models.relational_transformer.layer_map`). Its coordinates,
        prior and geometry are those of ``spec``. The per-block scale is carried over with a fan-in rule: every
        weight block takes the scale of the source layer it maps to times ``sqrt(fan_in_old / fan_in_new)``
        (exact for the canonical coordinates, whose hidden rows have unit norm and whose last layer has unit
        Frobenius norm; He-like for Euclidean weights), bias and global blocks keep theirs, so the field sees
        inputs of the same per-entry magnitude as in training. Saved with :meth:`save_pretrained`, it reloads as
        a flow of ``spec`` (``FlowConfig.field_widths`` records the field's own architecture).
        """
        if spec == self.spec:
            return self
        if self.config.anchor:
            raise ValueError("an anchored flow is tied to its anchor network's widths; it cannot be transferred to "
                             f"{spec.describe()}")
        if spec.activation != self.spec.activation:
            raise ValueError(f"this {self.config.flow} flow generates {self.spec.describe()} networks; it cannot "
                             f"generate {spec.describe()} (another activation)")
        from metaflow_ws.models.relational_transformer import layer_map

        self.field.check_spec(spec)
        field_spec = self.field.spec
        field_widths = None if field_spec.num_layers == spec.num_layers else field_spec.widths
        with torch.random.fork_rng(devices=[]):  # the throw-away modules of the new flow leave the RNG alone
            new = WeightFlow(dataclasses.replace(self.config, widths=spec.widths, field_widths=field_widths))
        new.field, new.encoder = self.field, self.encoder  # shared with this flow
        src, _ = layer_map(self.spec, spec)  # which of this flow's layers each new layer continues
        own = self.spec.offsets
        scale = torch.empty(new.dim, dtype=self.scale.dtype, device=self.scale.device)
        for name, (c, d) in spec.offsets.items():
            _, layer, kind = name.split(".")
            j = src[int(layer)]
            s = self.scale[own[f"layers.{j}.{kind}"][0]]
            if kind == "weight":
                s = s * (self.spec.widths[j] / spec.widths[int(layer)]) ** 0.5
            scale[c:d] = s
        if new.dim > spec.num_params:  # the global tail (log-scale) keeps its scale
            scale[spec.num_params:] = self.scale[self.spec.num_params]
        new = new.to(self.scale.device)
        new.scale = scale
        new._set_prior_rms()
        return new

    # --------------------------------------------------------------------------------------------- I/O
    def save_pretrained(self, folder: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` and ``flow.safetensors`` (atomically) into ``folder``."""
        from safetensors.torch import save

        folder = Path(folder)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        atomic_write_bytes(folder / WEIGHTS_NAME, save(tensors, metadata={"format": "metaflow_ws.flow"}))
        atomic_write_json(folder / CONFIG_NAME, {"config": self.config.to_dict(), **(extra or {})})
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, device: torch.device | str | None = None) -> WeightFlow:
        """Load a flow written by :meth:`save_pretrained` (or by ``metaflow-ws train``)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        folder = Path(folder)
        cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not cfg_path.is_file() or not w_path.is_file():
            raise FileNotFoundError(f"{folder} is not a flow folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}); "
                                    "train one with `metaflow-ws train --zoo ZOO --flow geometric --out DIR`")
        try:
            meta = json.loads(cfg_path.read_text())
            config = FlowConfig.from_dict(meta["config"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FlowFormatError(f"{cfg_path} is damaged ({e})") from e
        try:
            state = load(w_path.read_bytes())
        except SafetensorError as e:
            raise FlowFormatError(f"{w_path} is corrupt or truncated ({e}); retrain or restore it") from e
        flow = cls(config)
        flow.meta = {k: v for k, v in meta.items() if k != "config"}
        missing, unexpected = flow.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise FlowFormatError(f"{w_path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return flow.to(device) if device is not None else flow


def _blocks(spec: NetworkSpec, dim: int) -> list[tuple[int, int]]:
    """Parameter blocks of the flat coordinates (each weight matrix, each bias, and the global tail)."""
    blocks = list(spec.offsets.values())
    if dim > spec.num_params:
        blocks.append((spec.num_params, dim))
    return blocks


def block_rms(spec: NetworkSpec, x: Tensor, eps: float = 1e-6) -> Tensor:
    """``[dim]``: the RMS of each parameter block of flow coordinates ``x: [N, dim]`` over all N rows and the
    block's entries (at least ``eps``), repeated over the block's coordinates."""
    rms = torch.empty(x.shape[-1], dtype=x.dtype, device=x.device)
    for start, stop in _blocks(spec, x.shape[-1]):
        rms[start:stop] = x[:, start:stop].pow(2).mean().sqrt().clamp_min(eps)
    return rms
