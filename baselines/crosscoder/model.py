"""The acausal crosscoder: one sparse dictionary read from and written to n sources.

Shape letters (suffixes on every tensor name):

- ``B``: tokens in a batch
- ``M``: sources (two models at one hook each, or several hooks of one model)
- ``D``: concatenated source widths, ``D = Σ_m d_m`` (sources may differ in width, so the
  per-source blocks are slices ``offsets[m]:offsets[m+1]`` of one axis, not a separate axis)
- ``L``: latents (the dictionary size)
- ``N``: active (token, latent) pairs of a sparse code

Model (in normalized space, each source scaled by its store factor ``s_m`` so that its mean norm is
``sqrt(d_m)``)::

    pre_BL  = x_BD @ W_enc_LD.T + b_enc_L                  (= Σ_m W_enc[m] x_m + b_enc)
    f_BL    = act(pre_BL)
    x̂_BD    = f_BL @ W_dec_LD + b_dec_D                    (x̂_m = f W_dec[m] + b_dec[m])
    n_LM    = ‖W_dec_LD[:, m-slice]‖                       per-source decoder norms, n_L = Σ_m n_LM

Architectures (losses are means over the tokens of a batch, see :func:`crosscoder_loss`):

- ``l1`` (Anthropic 2024): ``act = ReLU``;
  ``loss = Σ_m ‖x_m − x̂_m‖² + λ · Σ_i f_i · n_i``.
- ``batchtopk`` (Minder, Dumas et al. 2025): training keeps, over the whole batch, the ``k·B``
  largest values of ``score_BL = ReLU(pre_BL) · n_L`` (``f = ReLU(pre)`` there, 0 elsewhere);
  inference keeps ``score > θ`` with the threshold ``θ`` learned during training (an EMA of the
  smallest kept score). ``loss = Σ_m ‖x_m − x̂_m‖² + α · aux`` with ``α = 1/32`` and
  ``aux = ‖e − ê‖² / ‖e‖²`` (means over tokens; ``e = x − x̂`` detached, ``ê`` the decoding without
  bias of the ``k_aux`` largest pre-activations among *dead* latents per token): dead latents get a
  gradient towards explaining the residual.

``scale_M`` holds the store's normalization factors; :meth:`CrossCoder.encode` and
:meth:`CrossCoder.decode` take and return raw activations. :func:`fold_normalization` moves the
factors into the weights (outputs unchanged).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffkit.errors import DiffkitError

from .model_util import all_reduce as _all_reduce
from .model_util import world as _world
from .sparse import DecodeAt, EncodeAt, select_batchtopk, select_rowtopk

ARCHS = ("l1", "batchtopk")
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "crosscoder.safetensors"
KIND = "diffkit.CrossCoder"
FORMAT_VERSION = 2  # 2: cfg.json is sealed (diffkit.io)


def strict_from_dict(cls: Any, data: dict, what: str) -> Any:
    """Build frozen dataclass ``cls`` from ``data``; unknown or missing keys are errors (no silent drop)."""
    names = {f.name for f in fields(cls)}
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    if not isinstance(data, dict):
        raise DiffkitError(f"{what} holds a JSON {type(data).__name__}, not an object: written by another version?")
    unknown, missing = sorted(set(data) - names), sorted(required - set(data))
    if unknown or missing:
        raise DiffkitError(f"{what}: unknown keys {unknown}, missing keys {missing}: written by another version?")
    wrong = [f"{f.name}={repr(data[f.name])[:30]} (not {f.type})" for f in fields(cls)
             if f.name in data and not _is_type(data[f.name], str(f.type))]
    if wrong:
        raise DiffkitError(f"{what}: wrong types {', '.join(wrong)}: the file is damaged or hand-edited")
    try:
        return cls(**data)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DiffkitError(f"{what}: {str(exc)[:120]}: the file is damaged or hand-edited") from None


def _is_type(value: Any, annotation: str) -> bool:
    """JSON value against a config field's annotation (int, float, str, bool, tuple[X, ...]); bool is no int."""
    if annotation.startswith("tuple[") and annotation.endswith(", ...]"):
        inner = annotation[len("tuple["):-len(", ...]")]
        return isinstance(value, (list, tuple)) and all(_is_type(v, inner) for v in value)
    if annotation == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if annotation == "int":
        return isinstance(value, int) and abs(value) < 2**53
    if annotation == "float":
        return isinstance(value, (int, float))
    if annotation == "str":
        return isinstance(value, str)
    return True


@dataclass(frozen=True)
class CrossCoderConfig:
    """Architecture of a crosscoder (saved as ``cfg.json``; never changed after training starts)."""

    d_in: tuple[int, ...]                 # width of each source
    dict_size: int                        # L
    arch: str = "batchtopk"
    k: int = 32                           # batchtopk: mean active latents per token
    sources: tuple[str, ...] = ("a", "b")
    hooks: tuple[str, ...] = ("", "")
    scale: tuple[float, ...] = (1.0, 1.0)  # raw * scale = normalized (the store's factors)
    folded: bool = False                  # True: scale folded into the weights (see fold_normalization)
    dec_init_norm: float = 0.08           # per-source decoder row norm at init
    k_aux: int = 0                        # batchtopk aux: top pre-acts of dead latents per token (0: D // 2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "d_in", tuple(int(d) for d in self.d_in))
        object.__setattr__(self, "sources", tuple(self.sources))
        object.__setattr__(self, "hooks", tuple(self.hooks))
        object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))
        if self.arch not in ARCHS:
            raise DiffkitError(f"--arch {self.arch!r} is not known: use one of {', '.join(ARCHS)}")
        if self.dict_size <= 0:
            raise DiffkitError(f"--dict-size must be positive, got {self.dict_size}")
        if not self.d_in or min(self.d_in) <= 0:
            raise DiffkitError(f"every source needs a positive width, got {self.d_in}")
        if not len(self.d_in) == len(self.sources) == len(self.hooks) == len(self.scale):
            raise DiffkitError(f"d_in, sources, hooks and scale must have one entry per source: {self}")
        if self.arch == "batchtopk" and not 0 < self.k <= self.dict_size:
            raise DiffkitError(f"--k {self.k} must be between 1 and --dict-size {self.dict_size}")
        if not all(math.isfinite(s) and s > 0 for s in self.scale):
            raise DiffkitError(f"normalization scales must be positive and finite, got {self.scale}")

    @property
    def offsets(self) -> list[int]:
        out = [0]
        for d in self.d_in:
            out.append(out[-1] + d)
        return out

    @property
    def d_total(self) -> int:
        return sum(self.d_in)

    @property
    def k_aux_eff(self) -> int:
        return min(self.dict_size, self.k_aux or max(1, self.d_total // 2))


@dataclass
class Forward:
    """What one forward pass returns (normalized space)."""

    f_BL: torch.Tensor | None       # dense code (None on the sparse path)
    x_hat_BD: torch.Tensor
    pre_BL: torch.Tensor | None     # pre-activations (None on the sparse path)
    active: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # sparse code: rows_N, cols_N, vals_N
    min_kept_score: torch.Tensor | None = None  # batchtopk: smallest kept score (for the threshold EMA)


class CrossCoder(nn.Module):
    """Parameters ``W_enc_LD``, ``b_enc_L``, ``W_dec_LD``, ``b_dec_D``; buffers ``scale_M``, ``threshold``."""

    def __init__(self, cfg: CrossCoderConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        L, D = cfg.dict_size, cfg.d_total
        gen = torch.Generator().manual_seed(seed)
        W_dec_LD = torch.randn(L, D, generator=gen)
        off = cfg.offsets
        for m in range(len(cfg.d_in)):  # each source's block of a row at norm dec_init_norm
            block = W_dec_LD[:, off[m]:off[m + 1]]
            block.mul_(cfg.dec_init_norm / block.norm(dim=1, keepdim=True))
        self.W_dec_LD = nn.Parameter(W_dec_LD)
        self.W_enc_LD = nn.Parameter(W_dec_LD.clone())  # encoder = decoder transposed
        self.b_enc_L = nn.Parameter(torch.zeros(L))
        self.b_dec_D = nn.Parameter(torch.zeros(D))
        self.register_buffer("scale_M", torch.tensor(cfg.scale, dtype=torch.float32))
        self.register_buffer("threshold", torch.tensor(-1.0))  # batchtopk inference; <0: not learned yet

    # -- norms and slices ----------------------------------------------------------------------
    def dec_norms_LM(self) -> torch.Tensor:
        """Per-source decoder norms in normalized space (also after folding)."""
        off = self.cfg.offsets
        cols = [self.W_dec_LD[:, off[m]:off[m + 1]].norm(dim=1) for m in range(len(self.cfg.d_in))]
        norms = torch.stack(cols, dim=1)
        return norms * self.scale_M if self.cfg.folded else norms

    def split(self, t_BD: torch.Tensor) -> list[torch.Tensor]:
        off = self.cfg.offsets
        return [t_BD[..., off[m]:off[m + 1]] for m in range(len(self.cfg.d_in))]

    # -- the numerical core (normalized space) -------------------------------------------------
    def forward(self, x_BD: torch.Tensor, train: bool = True, sparse: bool = False) -> Forward:
        """Encode and decode a normalized batch. ``train`` picks BatchTopK over the thresholded code."""
        cfg = self.cfg
        if cfg.arch == "l1":
            pre_BL = x_BD @ self.W_enc_LD.T + self.b_enc_L
            f_BL = torch.relu(pre_BL)
            return Forward(f_BL, f_BL @ self.W_dec_LD + self.b_dec_D, pre_BL)
        norm_L = self.dec_norms_LM().sum(dim=1)
        if not train:
            pre_BL = x_BD @ self.W_enc_LD.T + self.b_enc_L
            relu_BL = torch.relu(pre_BL)
            f_BL = relu_BL * (relu_BL * norm_L > self.threshold.clamp(min=0))
            return Forward(f_BL, f_BL @ self.W_dec_LD + self.b_dec_D, pre_BL)
        B = x_BD.shape[0]
        n_keep = cfg.k * B * _world()
        if not sparse:
            pre_BL = x_BD @ self.W_enc_LD.T + self.b_enc_L
            relu_BL = torch.relu(pre_BL)
            with torch.no_grad():  # the same exact selection as the sparse path
                rows_N, cols_N, vals = select_batchtopk(relu_BL * norm_L.detach(), n_keep, per_row=4 * cfg.k)
                mask = torch.zeros(B, cfg.dict_size, dtype=torch.bool, device=x_BD.device)
                mask[rows_N, cols_N] = True
            f_BL = relu_BL * mask
            return Forward(f_BL, f_BL @ self.W_dec_LD + self.b_dec_D, pre_BL,
                           min_kept_score=_min_positive(vals))
        # Sparse path (see .sparse): a dense, graph-free score picks the code; everything after
        # costs O(N·D). score = pre · n with n folded into one matmul.
        with torch.no_grad():
            n_L = norm_L.detach()
            score_BL = torch.addmm(self.b_enc_L * n_L, x_BD, (self.W_enc_LD * n_L[:, None]).T)
            rows_N, cols_N, score_N = select_batchtopk(score_BL, n_keep, per_row=4 * cfg.k)
            del score_BL
            pre_N = score_N / n_L[cols_N]
        vals_N = EncodeAt.apply(pre_N, x_BD, self.W_enc_LD, self.b_enc_L, rows_N, cols_N).relu()
        x_hat_BD = DecodeAt.apply(vals_N, self.W_dec_LD, rows_N, cols_N, B) + self.b_dec_D
        return Forward(None, x_hat_BD, None, (rows_N, cols_N, vals_N), _min_positive(score_N))

    # -- raw activations in and out ------------------------------------------------------------
    def _normalize(self, xs: list[torch.Tensor]) -> torch.Tensor:
        if len(xs) != len(self.cfg.d_in):
            raise DiffkitError(f"expected {len(self.cfg.d_in)} sources, got {len(xs)}")
        for m, (x, d) in enumerate(zip(xs, self.cfg.d_in)):
            if x.shape[-1] != d:
                raise DiffkitError(f"source {self.cfg.sources[m]} has width {x.shape[-1]}, the crosscoder expects {d}")
        x_BD = torch.cat([x.float() for x in xs], dim=-1)
        if self.cfg.folded:
            return x_BD
        return x_BD * torch.repeat_interleave(self.scale_M, torch.tensor(self.cfg.d_in, device=x_BD.device))

    @torch.no_grad()
    def encode(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """Raw activations (one tensor per source) -> code ``f_BL`` (inference: learned threshold)."""
        return self.forward(self._normalize(xs), train=False).f_BL

    @torch.no_grad()
    def decode(self, f_BL: torch.Tensor) -> list[torch.Tensor]:
        """Code -> raw reconstructions, one tensor per source."""
        x_hat = self.split(f_BL @ self.W_dec_LD + self.b_dec_D)
        if self.cfg.folded:
            return x_hat
        return [x / s for x, s in zip(x_hat, self.scale_M)]

    @torch.no_grad()
    def reconstruct(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.decode(self.encode(xs))


def _min_positive(vals: torch.Tensor) -> torch.Tensor:
    pos = vals[vals > 0]
    return _all_reduce(pos.min() if pos.numel() else vals.new_tensor(float("inf")), "min")


@dataclass
class LossParts:
    loss: torch.Tensor
    recon: torch.Tensor       # mean_B Σ_m ‖x_m − x̂_m‖²
    sparsity: torch.Tensor    # l1: λ · mean_B Σ_i f_i n_i (0 for batchtopk)
    aux: torch.Tensor         # batchtopk: α · ‖e − ê‖² / ‖e‖² (0 for l1)


def crosscoder_loss(model: CrossCoder, x_BD: torch.Tensor, out: Forward, l1: float = 0.0,
                    dead_L: torch.Tensor | None = None, aux_alpha: float = 1 / 32) -> LossParts:
    """The training loss of either architecture (equations in the module docstring).

    ``dead_L`` (bool) marks latents that have not fired for a while; only ``batchtopk`` uses it.
    """
    err_BD = x_BD - out.x_hat_BD.float()
    recon = err_BD.pow(2).sum(dim=1).mean()
    zero = recon.new_zeros(())
    if model.cfg.arch == "l1":
        sparsity = l1 * (out.f_BL.float() * model.dec_norms_LM().sum(dim=1)).sum(dim=1).mean()
        return LossParts(recon + sparsity, recon, sparsity, zero)
    aux = zero
    if dead_L is not None and bool(dead_L.any()):
        aux = aux_alpha * aux_loss(model, x_BD, err_BD.detach(), dead_L)
    return LossParts(recon + aux, recon, zero, aux)


def aux_loss(model: CrossCoder, x_BD: torch.Tensor, e_BD: torch.Tensor, dead_L: torch.Tensor) -> torch.Tensor:
    """``‖e − ê‖² / ‖e‖²`` (token means; the denominator is detached and global under DDP).

    ``ê`` decodes (without bias) the ``k_aux`` largest positive pre-activations among dead latents
    of each token. The dead latents' pre-activations are one graph-free matmul; the chosen pairs go
    through the sparse encode/decode, so the gradient reaches exactly the dead latents' encoder and
    decoder rows (the known bug: an aux loss whose gradient never reaches the weights).
    """
    B = x_BD.shape[0]
    dead_idx = torch.nonzero(dead_L).flatten()
    with torch.no_grad():
        pre_BK = torch.addmm(model.b_enc_L[dead_idx], x_BD, model.W_enc_LD[dead_idx].T)
        rows_N, cols_K, pre_N = select_rowtopk(pre_BK, model.cfg.k_aux_eff)
        cols_N = dead_idx[cols_K]  # ascending map: CSR order kept
    vals_N = EncodeAt.apply(pre_N, x_BD, model.W_enc_LD, model.b_enc_L, rows_N, cols_N).relu()
    e_hat_BD = DecodeAt.apply(vals_N, model.W_dec_LD, rows_N, cols_N, B)
    denom = _all_reduce(e_BD.pow(2).sum(dim=1).mean()) / _world()
    return (e_BD - e_hat_BD.float()).pow(2).sum(dim=1).mean() / denom.clamp(min=1e-12)


# -- artifacts -------------------------------------------------------------------------------------
def cfg_to_json(cfg: CrossCoderConfig) -> dict:
    return {"kind": KIND, "format_version": FORMAT_VERSION, **asdict(cfg)}


def save(model: CrossCoder, out: str | Path, extra: dict | None = None) -> Path:
    """Write ``cfg.json`` + ``crosscoder.safetensors`` into ``out`` (each atomically)."""
    from safetensors.torch import save as st_save

    from diffkit.io import atomic_write_bytes, sha256_bytes, write_sealed_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = st_save(tensors)
    atomic_write_bytes(out / WEIGHTS_FILE, data)
    write_sealed_json(out / CFG_FILE, {**cfg_to_json(model.cfg), "weights_sha256": sha256_bytes(data),
                                       **({"info": extra} if extra else {})})
    return out


def load(path: str | Path, device: str = "cpu") -> CrossCoder:
    """Load a saved crosscoder; it encodes and decodes *raw* activations (see module docstring).

    Strict: the config must have exactly the known keys of the right types, the weights file its
    recorded checksum, and every tensor its expected shape (checked before anything is allocated).
    """
    from diffkit.io import check_tensors, load_safetensors, read_sealed_json, verify_sha256

    path = Path(path)
    fix = "train it again or point at another `diffkit crosscoder train --out`"
    if not (path / CFG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
        raise DiffkitError(f"{path} is not a crosscoder (needs {CFG_FILE} and {WEIGHTS_FILE}): point at the --out of "
                           "`diffkit crosscoder train`")
    raw = read_sealed_json(path / CFG_FILE, KIND, FORMAT_VERSION, fix)
    del raw["kind"], raw["format_version"]
    raw.pop("info", None)
    verify_sha256(path / WEIGHTS_FILE, raw.pop("weights_sha256", None), fix)
    cfg = strict_from_dict(CrossCoderConfig, raw, str(path / CFG_FILE))
    state = load_safetensors(path / WEIGHTS_FILE, fix)
    L, D = cfg.dict_size, cfg.d_total
    expected = {"W_enc_LD": (L, D), "b_enc_L": (L,), "W_dec_LD": (L, D), "b_dec_D": (D,),
                "scale_M": (len(cfg.d_in),), "threshold": ()}
    check_tensors(state, expected, str(path / WEIGHTS_FILE), fix)
    if not all(bool(torch.isfinite(v).all()) for v in state.values()):
        raise DiffkitError(f"{path / WEIGHTS_FILE} holds non-finite (NaN/inf) values: {fix}")
    model = CrossCoder(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.to(device).eval()


@torch.no_grad()
def fold_normalization(model: CrossCoder) -> CrossCoder:
    """A copy whose weights absorb the normalization: raw x in, raw x̂ out, same code and outputs.

    ``W_enc[m] ← s_m W_enc[m]`` (so ``pre`` is unchanged) and ``W_dec[m], b_dec[m] ← · / s_m``; the
    decoder norms used for scores and penalties are multiplied back by ``s_m``
    (:meth:`CrossCoder.dec_norms_LM`), so BatchTopK picks the same latents.
    """
    if model.cfg.folded:
        return model
    folded = CrossCoder(replace(model.cfg, folded=True))
    folded.load_state_dict(model.state_dict())
    s_D = torch.repeat_interleave(model.scale_M, torch.tensor(model.cfg.d_in, device=model.scale_M.device))
    folded.W_enc_LD.mul_(s_D)
    folded.W_dec_LD.div_(s_D)
    folded.b_dec_D.div_(s_D)
    return folded.to(model.scale_M.device)
