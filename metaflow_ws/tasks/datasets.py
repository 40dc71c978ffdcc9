"""Dataset builders behind the task registry. Everything works offline.

A builder takes its keyword arguments from the task file's ``[dataset]`` table plus ``seed`` and returns a
:class:`TaskData` with deterministic train/val/test splits.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["BUILDERS", "DataUnavailableError", "TaskData", "register_builder", "read_idx", "write_idx"]


class DataUnavailableError(FileNotFoundError):
    """A dataset that must be read from a user folder is not there."""


@dataclass(frozen=True)
class TaskData:
    """Train/val/test splits. ``x_*``: (N, in) float32; ``y_*``: (N,) int64 labels or (N, out) float32 targets."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    info: dict

    def to(self, device: torch.device | str) -> TaskData:
        kw = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in kw.items():
            if isinstance(v, Tensor):
                kw[k] = v.to(device)
        return TaskData(**kw)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.x_train), "val": len(self.x_val), "test": len(self.x_test)}

    def split(self, name: str) -> tuple[Tensor, Tensor]:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; expected 'train', 'val' or 'test'")
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")


Builder = Callable[..., TaskData]
BUILDERS: dict[str, Builder] = {}


def register_builder(name: str) -> Callable[[Builder], Builder]:
    """Decorator: make a dataset builder available to task files as ``[dataset] builder = name``."""

    def deco(fn: Builder) -> Builder:
        BUILDERS[name] = fn
        return fn

    return deco


def _split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction + test_fraction must lie in [0, 1); got {val_fraction} + {test_fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    return perm[n_test + n_val :], perm[n_test : n_test + n_val], perm[:n_test]


def _from_arrays(
    x: np.ndarray,
    y: np.ndarray,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    standardize: bool,
    info: dict,
    test: tuple[np.ndarray, np.ndarray] | None = None,
) -> TaskData:
    """Split (x, y) by seed (or use a given test set), standardize with train statistics, make tensors."""
    x = np.asarray(x, dtype=np.float64)
    if test is None:
        tr, va, te = _split_indices(len(x), val_fraction, test_fraction, seed)
        xt, yt = x[te], y[te]
    else:
        tr, va, _ = _split_indices(len(x), val_fraction, 0.0, seed)
        xt, yt = np.asarray(test[0], dtype=np.float64), test[1]
    xtr, xva = x[tr], x[va]
    if standardize:
        mu, sd = xtr.mean(0), xtr.std(0)
        sd[sd < 1e-8] = 1.0
        xtr, xva, xt = (xtr - mu) / sd, (xva - mu) / sd, (xt - mu) / sd

    def lab(a: np.ndarray) -> Tensor:
        a = np.asarray(a)
        if a.dtype.kind in "iu":
            return torch.as_tensor(a, dtype=torch.int64)
        return torch.as_tensor(a, dtype=torch.float32)

    f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return TaskData(f(xtr), lab(y[tr]), f(xva), lab(y[va]), f(xt), lab(yt), info)


@register_builder("breast_cancer")
def breast_cancer(*, seed: int, val_fraction: float = 0.1, test_fraction: float = 0.2, standardize: bool = True) -> TaskData:
    """scikit-learn's bundled UCI Wisconsin diagnostic breast cancer data (569 × 30, 2 classes)."""
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    return _from_arrays(d.data, d.target.astype(np.int64), seed=seed, val_fraction=val_fraction,
                        test_fraction=test_fraction, standardize=standardize, info={"classes": 2})


@register_builder("digits")
def digits(
    *,
    seed: int,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    standardize: bool = False,
    permutation_seed: int | None = None,
    classes: list[int] | None = None,
) -> TaskData:
    """scikit-learn 8×8 digits (1,797 × 64, pixel values scaled to [0, 1]).

    ``permutation_seed`` applies a fixed pixel permutation (the ``digits_permuted`` family); ``classes`` keeps
    a subset of digits, relabelled 0..k-1 in the given order.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data / 16.0, d.target.astype(np.int64)
    if classes is not None:
        keep = np.isin(y, classes)
        remap = {c: i for i, c in enumerate(classes)}
        x, y = x[keep], np.array([remap[v] for v in y[keep]], dtype=np.int64)
    info: dict = {"classes": len(classes) if classes is not None else 10}
    if permutation_seed is not None:
        perm = np.random.default_rng(permutation_seed).permutation(x.shape[1])
        x = x[:, perm]
        info["permutation_seed"] = permutation_seed
    return _from_arrays(x, y, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                        standardize=standardize, info=info)


@register_builder("mnist1d")
def mnist1d(
    *,
    seed: int,
    val_fraction: float = 0.1,
    num_samples: int = 5000,
    data_seed: int = 42,
    shuffle_seq: bool = False,
    sequence_permutation_seed: int | None = None,
) -> TaskData:
    """MNIST-1D generated procedurally with ``mnist1d.data.make_dataset`` (never its download).

    The package's own 80/20 train/test split is kept (test set fixed by ``data_seed``); ``seed`` picks the
    validation part of the training set. ``sequence_permutation_seed`` shuffles the 40 positions (a related task).
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed, args.shuffle_seq = num_samples, data_seed, shuffle_seq
    state = np.random.get_state()  # make_dataset seeds numpy's global RNG; leave the caller's state alone
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(state)
    x, xt = d["x"], d["x_test"]
    info: dict = {"classes": 10}
    if sequence_permutation_seed is not None:
        perm = np.random.default_rng(sequence_permutation_seed).permutation(x.shape[1])
        x, xt = x[:, perm], xt[:, perm]
        info["sequence_permutation_seed"] = sequence_permutation_seed
    return _from_arrays(x, d["y"].astype(np.int64), seed=seed, val_fraction=val_fraction, test_fraction=0.0,
                        standardize=False, info=info, test=(xt, d["y_test"].astype(np.int64)))


@register_builder("sinusoid")
def sinusoid(
    *,
    seed: int,
    amplitude: float | None = None,
    phase: float | None = None,
    task_seed: int = 0,
    amplitude_range: tuple[float, float] = (0.1, 5.0),
    phase_range: tuple[float, float] = (0.0, math.pi),
    x_range: tuple[float, float] = (-5.0, 5.0),
    n_train: int = 10,
    n_val: int = 10,
    n_test: int = 100,
) -> TaskData:
    """One task of the MAML sinusoid family ``y = A sin(x − φ)``, x ~ U[x_range].

    The task is indexed by its parameters (``amplitude``, ``phase``); any left unset is drawn from its range by
    ``task_seed``. ``seed`` draws the input points.
    """
    trng = np.random.default_rng(task_seed)
    a_draw, p_draw = trng.uniform(*amplitude_range), trng.uniform(*phase_range)
    a = a_draw if amplitude is None else amplitude
    p = p_draw if phase is None else phase
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(*x_range, size=(n, 1)) for n in (n_train, n_val, n_test)]
    ys = [a * np.sin(x - p) for x in xs]
    f = lambda v: torch.as_tensor(v, dtype=torch.float32)  # noqa: E731
    return TaskData(f(xs[0]), f(ys[0]), f(xs[1]), f(ys[1]), f(xs[2]), f(ys[2]),
                    {"amplitude": float(a), "phase": float(p)})


@register_builder("none")
def no_data(*, seed: int) -> TaskData:  # noqa: ARG001 - every builder takes a seed
    """For synthetic weight families (``gaussian_toy``) that have no data."""
    e = torch.zeros(0, 0)
    return TaskData(e, e, e, e, e, e, {"synthetic": True})


# ------------------------------------------------------------------------------------------- IDX (MNIST)
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B,
              np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally ``.gz``); raises ``ValueError`` on a corrupt or truncated file."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated: header needs {header} bytes, file has {len(raw)}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    need = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != need:
        raise ValueError(f"{path} is truncated or corrupt: dims {dims} need {need} data bytes, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write an IDX file (used by tests to build tiny MNIST-like folders)."""
    array = np.asarray(array)
    dt = array.dtype.newbyteorder(">") if array.dtype.itemsize > 1 else array.dtype
    code = _IDX_CODES[np.dtype(dt)]
    with open(path, "wb") as fh:
        fh.write(bytes([0, 0, code, array.ndim]))
        fh.write(struct.pack(f">{array.ndim}I", *array.shape))
        fh.write(array.astype(dt).tobytes())


def _find_mnist_files(root: Path, subdir: str) -> dict[str, Path]:
    candidates = [root, root / subdir / "raw", root / subdir, root / "raw"]
    for base in candidates:
        found = {}
        for key, name in MNIST_FILES.items():
            for suffix in ("", ".gz"):
                if (base / (name + suffix)).is_file():
                    found[key] = base / (name + suffix)
                    break
        if len(found) == len(MNIST_FILES):
            return found
    expected = ", ".join(MNIST_FILES.values())
    raise DataUnavailableError(
        f"{subdir} files not found under {root} (looked in {', '.join(str(c) for c in candidates)}). "
        f"Expected the IDX files {expected} (optionally .gz), as raw files or in torchvision's "
        f"'{subdir}/raw' layout. Download them yourself and pass the folder with --data-dir or "
        f"METAFLOW_WS_DATA."
    )


def _idx_builder(subdir: str) -> Builder:
    def build(
        *, seed: int, root: str | None = None, val_fraction: float = 1 / 12, limit_train: int | None = None
    ) -> TaskData:
        folder = Path(root or os.environ.get("METAFLOW_WS_DATA") or Path.home() / ".metaflow_ws" / "data").expanduser()
        files = _find_mnist_files(folder, subdir)
        arr = {k: read_idx(p) for k, p in files.items()}
        x = arr["train_images"].reshape(len(arr["train_images"]), -1) / 255.0
        xt = arr["test_images"].reshape(len(arr["test_images"]), -1) / 255.0
        y, yt = arr["train_labels"].astype(np.int64), arr["test_labels"].astype(np.int64)
        if len(x) != len(y) or len(xt) != len(yt):
            raise ValueError(f"{subdir} in {folder}: image and label counts differ")
        if limit_train is not None:
            x, y = x[:limit_train], y[:limit_train]
        return _from_arrays(x, y, seed=seed, val_fraction=val_fraction, test_fraction=0.0, standardize=False,
                            info={"classes": 10, "root": str(folder)}, test=(xt, yt))

    build.__doc__ = f"{subdir} read from a user folder (raw IDX files or torchvision's '{subdir}/raw' layout)."
    return build


BUILDERS["mnist"] = _idx_builder("MNIST")
BUILDERS["fashion_mnist"] = _idx_builder("FashionMNIST")
