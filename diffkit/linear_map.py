"""Affine maps between two models' activation spaces, fitted in closed form from streamed moments.

The map is the first half of the training-free diff: it carries model A's SAE decoder directions
into model B's space. Fitting streams the store once: each shard's activations ``[x_a, x_b]`` are
centered on the shard mean and their cross-product added in float64 (Chan's pairwise update), so
memory is O((d_a + d_b)²) whatever the token count, and the solve is closed form:

- ``lstsq``:      W = S_xx⁺ S_xy                       (minimum-norm when S_xx is singular)
- ``ridge``:      W = (S_xx + α·n·I)⁻¹ S_xy             (α is per token: independent of the store size)
- ``procrustes``: W = s·U Vᵀ with U Σ Vᵀ = svd(S_xy), s = tr Σ / tr(Qᵀ S_xx Q), Q = U Vᵀ: orthogonal (semi-orthogonal
  when the widths differ: orthonormal rows if d_in < d_out, columns otherwise) up to one global scale.
  Q maximises tr(Qᵀ S_xy); that is the least-squares optimum when d_in ≤ d_out (‖x Q‖ is then
  fixed), not when d_in > d_out, where the constrained least-squares problem has no closed form
- always affine: b = ȳ − x̄ W (the first training-free diff had no centering and no bias).

with S_xx = Σ_t (x_t − x̄)ᵀ(x_t − x̄) and S_xy likewise over the *train* split. Both directions
(A→B and B→A) come from the same moments. Rows are tokens: ``y ≈ x @ W + b``.

Scores, on the held-out split (and on train, exactly from the moments): FVE / R² overall and per
output dimension, with the formula of :mod:`diffkit.metrics`:
``FVE = 1 − Σ_t ||y_t − ŷ_t||² / Σ_t ||y_t − ȳ||²``, ȳ the mean over the evaluated tokens.

Space: the map is fitted on **raw** activations by default, because SAEs read raw activations
(the zoo's, and most of sae-lens's registry). ``space="normalized"`` fits on the store's normalized
activations (x·scale); that map equals the raw one up to the scalar scale_b/scale_a on W (for
``lstsq``/``procrustes``), so cosines of carried directions are identical either way; for ``ridge``
the normalized space makes α comparable across models. ``map.json`` records the space and scales.

Example (the sklearn-style contract: options in ``__init__``, ``fit`` returns self, learned
values end in ``_``)::

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(1000, 1))
    >>> m = LinearMap().fit_arrays(x, 2 * x + 3)
    >>> round(float(m.W_ab_[0, 0]), 6), round(float(m.b_ab_[0]), 6)
    (2.0, 3.0)
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import DiffkitError
from .metrics import ErrorSums

MAP_KIND = "diffkit.LinearMap"
MAP_FORMAT_VERSION = 2  # 2: map.json is sealed (diffkit.io), its scores included
MAP_JSON = "map.json"
MAP_TENSORS = "map.safetensors"
METHODS = ("lstsq", "ridge", "procrustes")
SPACES = ("raw", "normalized")
DIRECTIONS = ("a_to_b", "b_to_a")
TOKENS_PER_DIM = 10  # fewer train tokens than this times d: the fit interpolates (failure 1 of the first diff)


@dataclass(frozen=True)
class MapConfig:
    """Options of a map fit (saved in ``map.json``)."""

    method: str = "lstsq"
    alpha: float = 0.0
    space: str = "raw"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise DiffkitError(f"unknown map method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.space not in SPACES:
            raise DiffkitError(f"unknown activation space {self.space!r}: use one of {', '.join(SPACES)}")
        if self.alpha < 0 or not np.isfinite(self.alpha):
            raise DiffkitError(f"--alpha must be a finite number >= 0, got {self.alpha}")
        if self.method == "ridge" and self.alpha == 0:
            raise DiffkitError("ridge with --alpha 0 is lstsq: pass --alpha > 0 or --method lstsq")
        if self.method != "ridge" and self.alpha != 0:
            raise DiffkitError(f"--alpha applies to ridge only, not {self.method}: drop it or use --method ridge")


class Moments:
    """Token count, mean and centered cross-product sum of concatenated rows z = [x_a, x_b], float64."""

    def __init__(self, d: int):
        self.n = 0
        self.mean = np.zeros(d)
        self.C = np.zeros((d, d))
        self.flops = 0.0  # multiply-adds of the cross-product GEMMs, x2

    def add(self, z: Any) -> None:
        """Add a block of rows (torch tensor or array, any float dtype)."""
        import torch

        z = torch.as_tensor(z).to(torch.float64)
        m = len(z)
        if m == 0:
            return
        mean_b = z.mean(0)
        zc = z - mean_b
        c_b = (zc.T @ zc).numpy()
        self.flops += 2.0 * m * z.shape[1] ** 2
        mean_b = mean_b.numpy()
        delta = mean_b - self.mean
        n = self.n + m
        self.C += c_b + np.outer(delta, delta) * (self.n * m / n)
        self.mean += delta * (m / n)
        self.n = n


def solve(C: np.ndarray, mean: np.ndarray, n: int, d_in: int, cfg: MapConfig, reverse: bool) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of one direction from the joint moments; ``reverse`` maps the second block onto the first."""
    from scipy import linalg

    i, o = (slice(d_in, None), slice(0, d_in)) if reverse else (slice(0, d_in), slice(d_in, None))
    sxx, sxy = C[i, i], C[i, o]
    if cfg.method == "lstsq":
        W = linalg.lstsq(sxx, sxy, cond=1e-12, lapack_driver="gelsd")[0]
    elif cfg.method == "ridge":
        W = linalg.solve(sxx + cfg.alpha * n * np.eye(len(sxx)), sxy, assume_a="pos")
    else:
        U, S, Vt = np.linalg.svd(sxy, full_matrices=False)
        Q = U @ Vt
        tr = float(np.einsum("ij,ij->", Q, sxx @ Q))  # tr(Qᵀ S_xx Q): the optimal scale for this Q
        W = (S.sum() / tr if tr > 0 else 1.0) * Q
    b = mean[o] - mean[i] @ W
    return W, b


def train_error_sums(C: np.ndarray, mean: np.ndarray, n: int, d_in: int, W: np.ndarray, reverse: bool) -> ErrorSums:
    """Train-split residual sums exactly from the moments (b centers the residual, so SSE = diag of Syy − 2WᵀSxy + WᵀSxxW)."""
    i, o = (slice(d_in, None), slice(0, d_in)) if reverse else (slice(0, d_in), slice(d_in, None))
    sxx, sxy, syy = C[i, i], C[i, o], C[o, o]
    sse = np.diag(syy) - 2 * np.einsum("ij,ij->j", W, sxy) + np.einsum("ij,ij->j", W, sxx @ W)
    my = mean[o]
    return ErrorSums(np.maximum(sse, 0.0), my * n, np.diag(syy) + n * my ** 2, n)


class LinearMap:
    """Affine maps A→B (``W_ab_``, ``b_ab_``) and B→A (``W_ba_``, ``b_ba_``); see the module docstring."""

    def __init__(self, method: str = "lstsq", alpha: float = 0.0, space: str = "raw"):
        self.method = method
        self.alpha = alpha
        self.space = space

    @property
    def config(self) -> MapConfig:
        return MapConfig(self.method, float(self.alpha), self.space)

    # -- fitting ---------------------------------------------------------------------------------
    def fit(self, store: Any, progress: bool = False) -> "LinearMap":
        """Fit on ``store``'s train split, score on its held-out split (both streamed shard by shard)."""
        from .progress import tqdm

        cfg = self.config
        normalized = cfg.space == "normalized"
        d_a, d_b = store.d_model("a"), store.d_model("b")
        n_train = store.n_tokens("train")
        train = tqdm(store.iter_shards("train", normalized=normalized), total=store.n_shards, desc="fit-map",
                     unit="shard", disable=not progress)
        held = store.iter_shards("heldout", normalized=normalized) if store.n_tokens("heldout") else iter(())
        self._fit(train, held, d_a, d_b, n_train)
        self.store_ = {"path": str(store.root), "hook_a": store.hook("a"), "hook_b": store.hook("b"),
                       "scale_a": store.scale("a"), "scale_b": store.scale("b"),
                       "model_a": store.manifest["sources"]["a"].get("spec"),
                       "model_b": store.manifest["sources"]["b"].get("spec")}
        return self

    def fit_arrays(self, x_a: Any, x_b: Any, x_a_heldout: Any = None, x_b_heldout: Any = None) -> "LinearMap":
        """Fit on in-memory arrays (rows are tokens); score on the held-out arrays when given."""
        x_a, x_b = np.asarray(x_a), np.asarray(x_b)
        held = iter([(x_a_heldout, x_b_heldout)]) if x_a_heldout is not None else iter(())
        self._fit(iter([(x_a, x_b)]), held, x_a.shape[1], x_b.shape[1], len(x_a))
        self.store_ = None
        return self

    def _fit(self, train: Iterable, held: Iterator, d_a: int, d_b: int, n_expected: int) -> None:
        import torch

        cfg = self.config
        d_max = max(d_a, d_b)
        if n_expected <= d_max:
            raise DiffkitError(f"the store has {n_expected:,} training tokens for activations of width {d_max}: "
                               f"a map needs more tokens than dimensions (at least {TOKENS_PER_DIM * d_max:,} "
                               "for a fit that generalizes); collect a larger store")
        self.warnings_: list[str] = []
        if n_expected < TOKENS_PER_DIM * d_max:
            msg = (f"only {n_expected:,} training tokens for width {d_max}: below {TOKENS_PER_DIM}·d = "
                   f"{TOKENS_PER_DIM * d_max:,}, the fit is close to interpolation (trust the held-out FVE, "
                   f"not the train FVE); collect at least {TOKENS_PER_DIM * d_max:,} tokens")
            self.warnings_.append(msg)
            warnings.warn(msg, stacklevel=3)
        moments = Moments(d_a + d_b)
        t0 = time.perf_counter()
        for a, b in train:
            moments.add(torch.cat([torch.as_tensor(a), torch.as_tensor(b)], dim=1))
        self.fit_seconds_ = time.perf_counter() - t0
        self.fit_flops_ = moments.flops
        self.d_a_, self.d_b_, self.n_train_ = d_a, d_b, moments.n
        self.mean_a_, self.mean_b_ = moments.mean[:d_a].copy(), moments.mean[d_a:].copy()
        self.W_ab_, self.b_ab_ = solve(moments.C, moments.mean, moments.n, d_a, cfg, reverse=False)
        self.W_ba_, self.b_ba_ = solve(moments.C, moments.mean, moments.n, d_a, cfg, reverse=True)
        train_ab = train_error_sums(moments.C, moments.mean, moments.n, d_a, self.W_ab_, reverse=False)
        train_ba = train_error_sums(moments.C, moments.mean, moments.n, d_a, self.W_ba_, reverse=True)
        held_ab, held_ba = ErrorSums.zeros(d_b), ErrorSums.zeros(d_a)
        for a, b in held:
            a = np.asarray(a, dtype=np.float64)
            b = np.asarray(b, dtype=np.float64)
            held_ab.add(b, a @ self.W_ab_ + self.b_ab_)
            held_ba.add(a, b @ self.W_ba_ + self.b_ba_)
        self.n_heldout_ = held_ab.n
        self.scores_ = {}
        for name, tr, he in (("a_to_b", train_ab, held_ab), ("b_to_a", train_ba, held_ba)):
            self.scores_[name] = {"train_fve": tr.fve(), "heldout_fve": he.fve(),
                                  "heldout_fve_per_dim": [None if not np.isfinite(v) else float(v)
                                                          for v in he.fve_per_dim()]}

    # -- use ---------------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "W_ab_"):
            raise DiffkitError("this LinearMap is not fitted: call fit() or LinearMap.load()")

    def predict_b(self, x_a: Any) -> np.ndarray:
        self._check_fitted()
        return np.asarray(x_a, dtype=np.float64) @ self.W_ab_ + self.b_ab_

    def predict_a(self, x_b: Any) -> np.ndarray:
        self._check_fitted()
        return np.asarray(x_b, dtype=np.float64) @ self.W_ba_ + self.b_ba_

    def carry_directions(self, dirs_a: Any) -> np.ndarray:
        """A-space directions (rows) through the linear part of A→B: ``dirs @ W_ab`` (no bias: directions, not points)."""
        self._check_fitted()
        return np.asarray(dirs_a, dtype=np.float64) @ self.W_ab_

    def describe(self) -> str:
        s = self.scores_
        return (f"{self.method} map, {self.space} activations, {self.n_train_:,} train / {self.n_heldout_:,} held-out "
                f"tokens: held-out FVE A→B {s['a_to_b']['heldout_fve']:.4f}, B→A {s['b_to_a']['heldout_fve']:.4f} "
                f"(train {s['a_to_b']['train_fve']:.4f}, {s['b_to_a']['train_fve']:.4f})")

    # -- artifact ------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        self._check_fitted()
        return {"kind": MAP_KIND, "format_version": MAP_FORMAT_VERSION, "config": asdict(self.config),
                "d_a": self.d_a_, "d_b": self.d_b_, "n_train": self.n_train_, "n_heldout": self.n_heldout_,
                "store": self.store_, "scores": self.scores_, "warnings": self.warnings_,
                "fit_seconds": self.fit_seconds_,
                "convention": "rows are tokens: y = x @ W + b; W_ab maps A to B, W_ba maps B to A",
                "fve_formula": "FVE = 1 - sum_t ||y_t - yhat_t||^2 / sum_t ||y_t - mean(y)||^2 (mean over the "
                               "evaluated split); per dim: same per output coordinate"}

    def save(self, out: str | Path) -> Path:
        """Write ``map.safetensors`` then ``map.json`` (each atomically; the JSON marks a complete artifact)."""
        import torch
        from safetensors.torch import save

        from .io import atomic_write_bytes, sha256_bytes, write_sealed_json

        self._check_fitted()
        out = Path(out)
        if out.exists() and not out.is_dir():
            raise DiffkitError(f"--out {out} is a file: pass a directory path")
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(getattr(self, k + "_"), dtype=np.float64))
                   for k in ("W_ab", "b_ab", "W_ba", "b_ba", "mean_a", "mean_b")}
        if (out / MAP_JSON).exists():
            (out / MAP_JSON).unlink()  # an old JSON must not vouch for new tensors mid-write
        data = save(tensors)
        atomic_write_bytes(out / MAP_TENSORS, data)
        write_sealed_json(out / MAP_JSON, {**self.to_json(), "tensors_sha256": sha256_bytes(data)})
        return out

    @classmethod
    def load(cls, path: str | Path) -> "LinearMap":
        """Read a saved map; a damaged or inconsistent one is a one-line DiffkitError (never a wrong map)."""
        import math

        import torch

        from .io import check_tensors, load_safetensors, read_sealed_json, verify_sha256

        path = Path(path)
        fix = "fit it again with `diffkit fit-map`"
        if not (path / MAP_JSON).exists() or not (path / MAP_TENSORS).exists():
            missing = MAP_JSON if not (path / MAP_JSON).exists() else MAP_TENSORS
            raise DiffkitError(f"--map {path} has no {missing}: point at a `diffkit fit-map --out` directory, or "
                               "drop --map to fit one")
        meta = read_sealed_json(path / MAP_JSON, MAP_KIND, MAP_FORMAT_VERSION, fix)
        verify_sha256(path / MAP_TENSORS, meta.get("tensors_sha256"), fix)
        try:
            d_a, d_b = meta["d_a"], meta["d_b"]
            for name, val in (("d_a", d_a), ("d_b", d_b), ("n_train", meta["n_train"]), ("n_heldout", meta["n_heldout"])):
                if isinstance(val, bool) or not isinstance(val, int) or val < (1 if name.startswith("d_") else 0):
                    raise ValueError(f"{name} = {repr(val)[:30]}")
            if not isinstance(meta["config"], dict) or not isinstance(meta["scores"], dict) or \
                    not isinstance(meta["warnings"], list):
                raise ValueError("config / scores / warnings")
            m = cls(**meta["config"])
            m.config  # validates method, alpha, space
            for k, d_out in (("a_to_b", d_b), ("b_to_a", d_a)):
                per_dim = meta["scores"][k]["heldout_fve_per_dim"]
                if not isinstance(per_dim, list) or len(per_dim) != d_out:
                    raise ValueError(f"scores.{k}.heldout_fve_per_dim (expected {d_out} values)")
                for fig, val in [("heldout_fve", meta["scores"][k]["heldout_fve"]),
                                 ("train_fve", meta["scores"][k]["train_fve"])] + [("per_dim", v) for v in per_dim]:
                    if val is not None and (isinstance(val, bool) or not isinstance(val, (int, float)) or val > 1 + 1e-9):
                        raise ValueError(f"scores.{k}.{fig} = {repr(val)[:30]} (an FVE: a number <= 1)")
            if not (meta["store"] is None or isinstance(meta["store"], dict)) or \
                    not all(isinstance(w, str) for w in meta["warnings"]):
                raise ValueError("store / warnings")
        except DiffkitError as exc:
            raise DiffkitError(f"{path / MAP_JSON}: {exc}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DiffkitError(f"{path / MAP_JSON} is malformed (bad or missing field {str(exc)[:80]}): {fix}") from None
        need = {"W_ab": (d_a, d_b), "b_ab": (d_b,), "W_ba": (d_b, d_a), "b_ba": (d_a,), "mean_a": (d_a,),
                "mean_b": (d_b,)}
        tensors = load_safetensors(path / MAP_TENSORS, fix)
        check_tensors(tensors, need, str(path / MAP_TENSORS), fix)
        not64 = sorted(k for k in need if tensors[k].dtype != torch.float64)
        if not64:
            raise DiffkitError(f"{path / MAP_TENSORS}: tensors {not64} are not float64 as `diffkit fit-map` writes them: "
                               f"{fix}")
        for key in need:
            value = tensors[key].numpy()
            if not np.isfinite(value).all():
                raise DiffkitError(f"{path / MAP_TENSORS}: {key} has non-finite values: {fix}")
            setattr(m, key + "_", value)
        m.d_a_, m.d_b_ = d_a, d_b
        m.n_train_, m.n_heldout_ = meta["n_train"], meta["n_heldout"]
        m.store_, m.scores_, m.warnings_ = meta["store"], meta["scores"], meta["warnings"]
        fit_seconds = meta.get("fit_seconds")
        m.fit_seconds_ = float(fit_seconds) if isinstance(fit_seconds, (int, float)) else math.nan
        m.fit_flops_ = math.nan
        return m
