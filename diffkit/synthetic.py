"""Planted ground truth: two "models" whose shared and exclusive features are known exactly.

Each model's activation is a sparse sum of feature directions (the *generating dictionary*) plus
a mean offset and optional noise::

    x_a = Σ_i c_i d^A_i + μ_A (+ noise)              over A's features (shared and A-only)
    x_b = s_B · Σ_j g_j c_j d^B_j + μ_B (+ noise)    over B's features (shared and B-only)

A shared feature fires on the same tokens with the same coefficient in both models, and its
direction in B is its direction in A carried through a known linear map ``M`` (a random rotation
when the widths agree, semi-orthogonal otherwise): ``d^B = normalize(d^A M)``, the coefficient
rescaled by ``‖d^A M‖`` so that the shared part of ``x_b`` is exactly ``s_B · (shared part of
x_a) M``. Exclusive features are random directions that fire in one model only. Both
dictionaries are stored in a random order, so recovering the pairing means undoing a known
permutation.

Changed strength: ``n_changed`` of the shared features have gain ``g_j = change_factor`` in B
(``g_j = 1`` for every other feature): same direction, same tokens, a coefficient
``change_factor`` times larger (``< 1``: weaker). Their rows are ``changed_a`` / ``changed_b``
(paired, a subset of ``shared_a`` / ``shared_b``); for them the identity above holds with the
factor, ``c_j d^B_j = change_factor · s_B · (c_i d^A_i) M``. The choice costs no random draw,
so a config with ``n_changed = 0`` gives exactly the pair it gave before the option existed.

Superposition: each model has more features than dimensions when ``n_features / d`` (the
:attr:`PlantedConfig.superposition` ratios) exceeds 1; :func:`planted_config` builds a config
from that ratio, the fraction of exclusive features and the fraction of changed ones.
Frequencies are heavy-tailed: feature firing rates follow a Zipf law of exponent ``zipf`` over
a random ranking.

Use :func:`make_planted` for the tensors, :func:`write_planted_store` for an on-disk
:class:`~diffkit.activations.ActivationStore` (the same format ``diffkit collect`` writes), and
:func:`write_planted_saes` for sae-lens SAEs whose decoders are the generating dictionaries — the
inputs every diffkit stage reads, with the right answer known.

Conventions: row vectors, ``x_b ≈ x_a @ map_ab + const`` (``map_ab`` is d_a × d_b, raw units).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import __version__
from .errors import DiffkitError
from .store_format import FORMAT_VERSION, MANIFEST, STORE_KIND, shard_files, write_manifest
from .io import atomic_save_npy

PLANTED_HOOK = "planted.hook_resid"


@dataclass(frozen=True)
class PlantedConfig:
    """What a planted pair looks like. Defaults give a small problem that runs in well under a second."""

    d_a: int = 64
    d_b: int = 64
    n_shared: int = 192
    n_a_only: int = 32
    n_b_only: int = 32
    k: float = 4.0            # mean number of active features per token of A (B: about the same)
    n_tokens: int = 32_768
    ctx: int = 64             # tokens per (fake) sequence in the written store
    noise: float = 0.0        # isotropic Gaussian noise, std per dimension relative to the mean feature norm
    scale_b: float = 1.0      # B's activations are s_B times larger (models differ in norm)
    offset: float = 1.0       # norm of each model's random mean vector μ
    zipf: float = 0.5         # feature i of a model fires with probability ∝ (rank)^-zipf
    n_changed: int = 0        # shared features whose coefficient in B is multiplied by change_factor
    change_factor: float = 2.0
    heldout_every: int = 10   # every n-th sequence is held out, as in ``diffkit collect``
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("d_a", "d_b", "n_tokens", "ctx"):
            if getattr(self, name) <= 0:
                raise DiffkitError(f"planted {name} must be positive, got {getattr(self, name)}")
        for name in ("n_shared", "n_a_only", "n_b_only"):
            if getattr(self, name) < 0:
                raise DiffkitError(f"planted {name} must be ≥ 0, got {getattr(self, name)}")
        if self.n_shared + self.n_a_only == 0 or self.n_shared + self.n_b_only == 0:
            raise DiffkitError("each planted model needs at least one feature")
        if not 0 < self.k <= min(self.n_shared + self.n_a_only, self.n_shared + self.n_b_only):
            raise DiffkitError(f"planted k={self.k} must be in (0, number of features of each model]")
        if not 0 <= self.n_changed <= self.n_shared:
            raise DiffkitError(f"planted n_changed={self.n_changed} must be between 0 and n_shared={self.n_shared}")
        if not (self.change_factor > 0 and math.isfinite(self.change_factor)):
            raise DiffkitError(f"planted change_factor must be positive and finite, got {self.change_factor}")

    @property
    def superposition(self) -> tuple[float, float]:
        """Features per dimension of A and of B (> 1: more features than dimensions)."""
        return (self.n_shared + self.n_a_only) / self.d_a, (self.n_shared + self.n_b_only) / self.d_b


def planted_config(d: int = 64, superposition: float = 4.0, frac_exclusive: float = 0.125,
                   frac_changed: float = 0.0, **options) -> PlantedConfig:
    """A config with ``round(superposition · d)`` features per model (both widths ``d``).

    ``frac_exclusive`` of each model's features are its own (A-only, B-only), the rest shared;
    ``frac_changed`` of the shared ones change strength in B. Other fields via ``options``.
    """
    n = round(superposition * d)
    if n < 1 or not 0 <= frac_exclusive < 1 or not 0 <= frac_changed <= 1:
        raise DiffkitError(f"planted superposition {superposition} × d {d} must give ≥ 1 feature, frac_exclusive "
                           f"in [0, 1) and frac_changed in [0, 1]; got {frac_exclusive}, {frac_changed}")
    n_excl = round(frac_exclusive * n)
    n_shared = n - n_excl
    return PlantedConfig(d_a=d, d_b=d, n_shared=n_shared, n_a_only=n_excl, n_b_only=n_excl,
                         n_changed=round(frac_changed * n_shared), **options)


@dataclass(frozen=True)
class PlantedPair:
    """A planted pair and its answer key. Index arrays point into the rows of ``dict_a`` / ``dict_b``."""

    config: PlantedConfig
    dict_a: np.ndarray      # (n_a, d_a) unit rows: A's generating dictionary
    dict_b: np.ndarray      # (n_b, d_b) unit rows: B's generating dictionary
    shared_a: np.ndarray    # (n_shared,) row of dict_a of shared feature i
    shared_b: np.ndarray    # (n_shared,) row of dict_b of the same feature
    a_only: np.ndarray      # rows of dict_a that B lacks
    b_only: np.ndarray      # rows of dict_b that A lacks
    map_ab: np.ndarray      # (d_a, d_b): shared part of x_b = (shared part of x_a) @ map_ab (unchanged features;
                            # a changed one carries change_factor too)
    codes_a: np.ndarray     # (n_tokens, n_a) float32 coefficients of A's features
    codes_b: np.ndarray     # (n_tokens, n_b) float32 coefficients of B's features (raw units of x_b)
    acts_a: np.ndarray      # (n_tokens, d_a) float32
    acts_b: np.ndarray      # (n_tokens, d_b) float32
    mean_a: np.ndarray      # μ_A
    mean_b: np.ndarray      # μ_B
    # Last and optional, so positional construction (as before changed strength existed) still works.
    changed_a: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (n_changed,) rows of dict_a
    changed_b: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # their partners in dict_b

    @property
    def match_a_to_b(self) -> np.ndarray:
        """For each row of dict_a: its partner's row in dict_b, or -1 for A-only features."""
        out = np.full(len(self.dict_a), -1, dtype=np.int64)
        out[self.shared_a] = self.shared_b
        return out

    @property
    def match_b_to_a(self) -> np.ndarray:
        """For each row of dict_b: its partner's row in dict_a, or -1 for B-only features."""
        out = np.full(len(self.dict_b), -1, dtype=np.int64)
        out[self.shared_b] = self.shared_a
        return out


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _orthonormal_map(d_a: int, d_b: int, rng: np.random.Generator) -> np.ndarray:
    """A d_a × d_b matrix with orthonormal rows (d_a ≤ d_b) or columns (d_a > d_b)."""
    big, small = max(d_a, d_b), min(d_a, d_b)
    q, r = np.linalg.qr(rng.standard_normal((big, small)))
    q = q * np.sign(np.diag(r))  # a uniformly random orthonormal frame (Haar), not QR's sign convention
    return q.T if d_a <= d_b else q


def _advanced(state: dict, draws: int) -> dict:
    """The PCG64 ``state`` after ``draws`` 64-bit outputs, keeping its buffered 32-bit half as it was.

    ``Generator.random`` and ``Generator.uniform`` take exactly one 64-bit output per float64, so a
    row range of a (tokens, features) draw starts ``row · features`` outputs in. The buffered half
    (left by a bounded-integer draw such as ``permutation``) is untouched by 64-bit draws, so it
    must survive the jump (``advance`` alone clears it).
    """
    bg = np.random.PCG64()
    bg.state = state
    bg.advance(draws)
    out = bg.state
    out["has_uint32"], out["uinteger"] = state["has_uint32"], state["uinteger"]
    return out


def _generator(state: dict) -> np.random.Generator:
    gen = np.random.Generator(np.random.PCG64())
    gen.bit_generator.state = state
    return gen


@dataclass(frozen=True)
class _CodeBlock:
    """One block of features' codes (shared, A-only or B-only): rates, and where its two draws start."""

    n_features: int
    rates: np.ndarray
    fires_state: dict   # state before the (n_tokens, n_features) uniform draw that decides firing
    n_tokens: int

    def rows(self, t0: int, t1: int) -> np.ndarray:
        """Codes of tokens [t0, t1): the same numbers as rows t0:t1 of one (n_tokens, n_features) draw."""
        f = self.n_features
        if f == 0:
            return np.zeros((t1 - t0, 0), np.float32)
        fires = _generator(_advanced(self.fires_state, t0 * f)).random((t1 - t0, f)) < self.rates
        magnitude = _generator(_advanced(self.fires_state, (self.n_tokens + t0) * f)).uniform(0.5, 1.5, size=(t1 - t0, f))
        return np.where(fires, magnitude, 0.0).astype(np.float32)

    def sparse_rows(self, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The nonzeros of :meth:`rows` as (row, column, value), row-major: the same numbers, no dense copy."""
        f = self.n_features
        if f == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        row, col = np.nonzero(_generator(_advanced(self.fires_state, t0 * f)).random((t1 - t0, f)) < self.rates)
        magnitude = _generator(_advanced(self.fires_state, (self.n_tokens + t0) * f)).uniform(0.5, 1.5, size=(t1 - t0, f))
        return row, col, magnitude[row, col].astype(np.float32)


def _code_block(n_tokens: int, n_features: int, k: float, zipf: float, rng: np.random.Generator) -> _CodeBlock:
    """Sparse nonnegative coefficients; feature firing rates follow a Zipf-like law summing to k.

    Draws the rates from ``rng`` and moves ``rng`` past the code matrices (2 · n_tokens · n_features
    outputs) without drawing them: :meth:`_CodeBlock.rows` draws any row range on demand.
    """
    rates = (1.0 + rng.permutation(n_features)) ** -zipf
    rates = np.minimum(1.0, rates * k / rates.sum())
    state = rng.bit_generator.state
    rng.bit_generator.state = _advanced(state, 2 * n_tokens * n_features)
    return _CodeBlock(n_features, rates, state, n_tokens)


class PlantedStream:
    """A planted pair whose per-token arrays are drawn on demand, a range of tokens at a time.

    Everything but the tokens (dictionaries, answer key, map, means) is drawn at construction,
    exactly as :func:`make_planted` draws it; :meth:`chunk` and :meth:`chunks` give the codes and
    activations of any token range, equal to the same rows of :func:`make_planted`'s arrays (codes
    bit for bit; activations to float32 rounding when ``sparse``, since a sparse product sums in
    another order). Memory is O(chunk × features), so 65,536-feature pairs stream where the dense
    (tokens × features) codes would not fit. Attributes are :class:`PlantedPair`'s minus the
    per-token arrays.
    """

    def __init__(self, cfg: PlantedConfig = PlantedConfig()):
        rng = np.random.default_rng(cfg.seed)
        self.config = cfg
        n_a, n_b = cfg.n_shared + cfg.n_a_only, cfg.n_shared + cfg.n_b_only
        m = _orthonormal_map(cfg.d_a, cfg.d_b, rng)
        shared_dirs_a = _unit_rows(rng.standard_normal((cfg.n_shared, cfg.d_a)))
        carried = shared_dirs_a @ m                              # (n_shared, d_b)
        carried_norm = np.linalg.norm(carried, axis=1)
        dirs_a = np.concatenate([shared_dirs_a, _unit_rows(rng.standard_normal((cfg.n_a_only, cfg.d_a)))])
        del shared_dirs_a
        dirs_b = np.concatenate([carried / carried_norm[:, None],
                                 _unit_rows(rng.standard_normal((cfg.n_b_only, cfg.d_b)))])
        del carried
        # Shared features fire together: one code block, A's copy and B's (rescaled) copy.
        k_shared = cfg.k * cfg.n_shared / n_a
        self._shared = _code_block(cfg.n_tokens, cfg.n_shared, k_shared, cfg.zipf, rng)
        self._a_only = _code_block(cfg.n_tokens, cfg.n_a_only, cfg.k - k_shared, cfg.zipf, rng) if cfg.n_a_only \
            else _CodeBlock(0, np.zeros(0), {}, cfg.n_tokens)
        k_b_only = cfg.k * cfg.n_b_only / n_b
        self._b_only = _code_block(cfg.n_tokens, cfg.n_b_only, k_b_only, cfg.zipf, rng) if cfg.n_b_only \
            else _CodeBlock(0, np.zeros(0), {}, cfg.n_tokens)
        gain = np.ones(cfg.n_shared, np.float32)
        gain[:cfg.n_changed] = cfg.change_factor  # shared features are in random frequency order: no draw needed
        self._shared_gain_b = (gain * carried_norm)[None, :].astype(np.float32)
        # Hide the answer: store both dictionaries in random order.
        self._perm_a, self._perm_b = rng.permutation(n_a), rng.permutation(n_b)  # new row r holds old feature perm[r]
        inv_a, inv_b = np.argsort(self._perm_a), np.argsort(self._perm_b)     # old feature f sits at new row inv[f]
        self._dict_a64, self._dict_b64 = dirs_a[self._perm_a], dirs_b[self._perm_b]
        del dirs_a, dirs_b
        mean_a = cfg.offset * _unit_rows(rng.standard_normal((1, cfg.d_a)))[0]
        mean_b = cfg.offset * _unit_rows(rng.standard_normal((1, cfg.d_b)))[0]
        self._noise_state = rng.bit_generator.state
        self.dict_a, self.dict_b = self._dict_a64.astype(np.float32), self._dict_b64.astype(np.float32)
        self.shared_a, self.shared_b = inv_a[:cfg.n_shared], inv_b[:cfg.n_shared]
        self.a_only, self.b_only = np.sort(inv_a[cfg.n_shared:]), np.sort(inv_b[cfg.n_shared:])
        self.changed_a, self.changed_b = inv_a[:cfg.n_changed], inv_b[:cfg.n_changed]
        self.map_ab = (cfg.scale_b * m).astype(np.float32)
        self._mean_a64, self._mean_b64 = mean_a, mean_b
        self.mean_a, self.mean_b = mean_a.astype(np.float32), mean_b.astype(np.float32)

    match_a_to_b = PlantedPair.match_a_to_b
    match_b_to_a = PlantedPair.match_b_to_a

    def codes(self, t0: int, t1: int) -> tuple[np.ndarray, np.ndarray]:
        """(codes_a, codes_b) of tokens [t0, t1), float32, rows of :func:`make_planted`'s arrays."""
        cfg = self.config
        if not 0 <= t0 <= t1 <= cfg.n_tokens:
            raise DiffkitError(f"token range [{t0}, {t1}) is outside the planted pair's {cfg.n_tokens} tokens")
        shared = self._shared.rows(t0, t1)
        codes_a = np.concatenate([shared, self._a_only.rows(t0, t1)], axis=1)[:, self._perm_a]
        codes_b = cfg.scale_b * np.concatenate([shared * self._shared_gain_b, self._b_only.rows(t0, t1)], axis=1)
        return codes_a, codes_b[:, self._perm_b].astype(np.float32)

    def sparse_codes(self, t0: int, t1: int) -> tuple[Any, Any]:
        """(codes_a, codes_b) of tokens [t0, t1) as scipy CSR matrices: :meth:`codes` without the dense arrays."""
        from scipy.sparse import csr_matrix

        cfg = self.config
        n = t1 - t0
        inv_a, inv_b = np.argsort(self._perm_a), np.argsort(self._perm_b)
        r_s, c_s, v_s = self._shared.sparse_rows(t0, t1)
        r_a, c_a, v_a = self._a_only.sparse_rows(t0, t1)
        r_b, c_b, v_b = self._b_only.sparse_rows(t0, t1)
        n_a, n_b = len(self._perm_a), len(self._perm_b)
        codes_a = csr_matrix((np.concatenate([v_s, v_a]), (np.concatenate([r_s, r_a]),
                                                           inv_a[np.concatenate([c_s, cfg.n_shared + c_a])])),
                             shape=(n, n_a))
        vb_shared = np.float32(cfg.scale_b) * (v_s * self._shared_gain_b[0, c_s])
        vb_only = (np.float32(cfg.scale_b) * v_b).astype(np.float32)
        codes_b = csr_matrix((np.concatenate([vb_shared, vb_only]), (np.concatenate([r_s, r_b]),
                                                                     inv_b[np.concatenate([c_s, cfg.n_shared + c_b])])),
                             shape=(n, n_b))
        return codes_a, codes_b

    def _noise_generators(self) -> tuple[np.random.Generator, np.random.Generator]:
        """Generators at the start of A's and of B's noise; B's starts after all of A's (variable-length draws)."""
        cfg = self.config
        gen_a, skip = _generator(self._noise_state), _generator(self._noise_state)
        step = max(1, (1 << 24) // cfg.d_a)
        for t in range(0, cfg.n_tokens, step):  # bounded memory: draw A's noise again, block by block, to skip it
            skip.standard_normal((min(step, cfg.n_tokens - t), cfg.d_a))
        return gen_a, skip

    def chunks(self, chunk_tokens: int, sparse: bool = True, with_codes: bool = False) -> Iterator["PlantedChunk"]:
        """Consecutive chunks of ``chunk_tokens`` tokens (the last may be shorter), in token order."""
        cfg = self.config
        if chunk_tokens <= 0:
            raise DiffkitError(f"chunk_tokens must be positive, got {chunk_tokens}")
        noise_a = noise_b = None
        if cfg.noise > 0:
            noise_a, noise_b = self._noise_generators()
        feature_norm = math.sqrt(cfg.k * 1.0833)  # E‖Σ c_i d_i‖ for k unit directions, c ~ U(0.5, 1.5)
        for t0 in range(0, cfg.n_tokens, chunk_tokens):
            t1 = min(cfg.n_tokens, t0 + chunk_tokens)
            if sparse:
                sp_a, sp_b = self.sparse_codes(t0, t1)
                ids = _ids_from_sparse(sp_a)
                acts_a = np.asarray(sp_a @ self.dict_a, dtype=np.float32) + self.mean_a
                acts_b = np.asarray(sp_b @ self.dict_b, dtype=np.float32) + self.mean_b
                codes_a, codes_b = (sp_a.toarray(), sp_b.toarray()) if with_codes else (None, None)
            else:
                codes_a, codes_b = self.codes(t0, t1)
                ids = _ids_from_codes(codes_a)
                acts_a = codes_a @ self.dict_a + self._mean_a64.astype(np.float32)
                acts_b = codes_b @ self.dict_b + self._mean_b64.astype(np.float32)
            if noise_a is not None:
                acts_a += noise_a.normal(0, cfg.noise * feature_norm / math.sqrt(cfg.d_a),
                                         (t1 - t0, cfg.d_a)).astype(np.float32)
                acts_b += noise_b.normal(0, cfg.noise * cfg.scale_b * feature_norm / math.sqrt(cfg.d_b),
                                         (t1 - t0, cfg.d_b)).astype(np.float32)
            yield PlantedChunk(t0, ids, acts_a.astype(np.float32), acts_b.astype(np.float32),
                               codes_a if with_codes else None, codes_b if with_codes else None)

    def materialize(self) -> PlantedPair:
        """All tokens in memory (dense codes): :func:`make_planted`'s pair."""
        cfg = self.config
        (chunk,) = list(self.chunks(cfg.n_tokens, sparse=False, with_codes=True))
        return PlantedPair(
            config=cfg, dict_a=self.dict_a, dict_b=self.dict_b, shared_a=self.shared_a, shared_b=self.shared_b,
            a_only=self.a_only, b_only=self.b_only, changed_a=self.changed_a, changed_b=self.changed_b,
            map_ab=self.map_ab, codes_a=chunk.codes_a, codes_b=chunk.codes_b, acts_a=chunk.acts_a,
            acts_b=chunk.acts_b, mean_a=self.mean_a, mean_b=self.mean_b)


@dataclass(frozen=True)
class PlantedChunk:
    """Tokens [t0, t0 + len(ids)) of a planted pair: fake token ids, activations, and (optionally) codes."""

    t0: int
    ids: np.ndarray
    acts_a: np.ndarray
    acts_b: np.ndarray
    codes_a: np.ndarray | None = None
    codes_b: np.ndarray | None = None


def make_planted(cfg: PlantedConfig = PlantedConfig()) -> PlantedPair:
    """Draw a planted pair (deterministic in ``cfg.seed``), every array in memory.

    Memory is O(n_tokens × features) (dense codes): for wide dictionaries stream the pair with
    :class:`PlantedStream` / :func:`write_planted_store` ``(PlantedStream(cfg), ...)`` instead.
    """
    return PlantedStream(cfg).materialize()


def _ids_from_codes(codes_a: np.ndarray) -> np.ndarray:
    """Readable fake tokens: the letter of the token's strongest A feature ('a'..'z'), space if none."""
    strongest = codes_a.argmax(axis=1)
    return np.where(codes_a.max(axis=1) > 0, 97 + strongest % 26, 32).astype(np.int32)


def _ids_from_sparse(codes_a: Any) -> np.ndarray:
    """:func:`_ids_from_codes` of a CSR matrix: the first column holding each row's maximum (as argmax)."""
    coo = codes_a.tocoo()
    order = np.lexsort((coo.col, -coo.data, coo.row))   # by row, then largest value, then lowest column
    row, col = coo.row[order], coo.col[order]
    first = np.ones(len(row), bool)
    first[1:] = row[1:] != row[:-1]
    ids = np.full(codes_a.shape[0], 32, np.int32)
    ids[row[first]] = (97 + col[first] % 26).astype(np.int32)
    return ids


def _token_ids(pair: PlantedPair) -> np.ndarray:
    return _ids_from_codes(pair.codes_a)


def write_planted_store(pair: PlantedPair | PlantedStream, out: str | Path, seqs_per_shard: int = 64) -> Path:
    """Write ``pair``'s activations as an ActivationStore at ``out`` (same format as ``diffkit collect``).

    Tokens are cut into sequences of ``ctx`` positions (no BOS); every ``heldout_every``-th
    sequence is held out; within a shard, training rows come first, as the reader expects. The
    trailing tokens that do not fill a sequence are dropped. A :class:`PlantedStream` is drawn
    shard by shard (memory: one shard's codes), so the store may be far larger than memory.
    """
    from .activations import CollectConfig, finish_manifest, is_heldout

    cfg = pair.config
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DiffkitError(f"{out} exists and is not empty: choose a new directory for the planted store")
    n_seqs = cfg.n_tokens // cfg.ctx
    if n_seqs == 0:
        raise DiffkitError(f"planted n_tokens {cfg.n_tokens} is less than one sequence of ctx {cfg.ctx}")
    if isinstance(pair, PlantedStream):
        shard_rows = (PlantedChunk(c.t0, c.ids, c.acts_a, c.acts_b)
                      for c in pair.chunks(seqs_per_shard * cfg.ctx))
    else:
        ids_all = _token_ids(pair)
        shard_rows = (PlantedChunk(t0, ids_all[t0:t0 + seqs_per_shard * cfg.ctx],
                                   pair.acts_a[t0:t0 + seqs_per_shard * cfg.ctx],
                                   pair.acts_b[t0:t0 + seqs_per_shard * cfg.ctx])
                      for t0 in range(0, n_seqs * cfg.ctx, seqs_per_shard * cfg.ctx))
    collect = CollectConfig(model_a="planted:a", model_b="planted:b", hook_a=PLANTED_HOOK, hook_b=PLANTED_HOOK,
                            corpus=f"planted:seed{cfg.seed}", tokens=n_seqs * cfg.ctx, ctx=cfg.ctx, seed=cfg.seed,
                            heldout_every=cfg.heldout_every)
    sources = {src: {"spec": f"planted:{src}", "d_model": d, "hook": PLANTED_HOOK, "planted": asdict(cfg)}
               for src, d in (("a", cfg.d_a), ("b", cfg.d_b))}
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"kind": STORE_KIND, "format_version": FORMAT_VERSION, "diffkit_version": __version__,
                "config": asdict(collect), "complete": False, "seqs_per_shard": seqs_per_shard, "has_bos": False,
                "shards": [], "sources": sources}
    for index, (seq_start, chunk) in enumerate(zip(range(0, n_seqs, seqs_per_shard), shard_rows)):
        seqs = np.arange(seq_start, min(n_seqs, seq_start + seqs_per_shard))
        held = np.array([is_heldout(int(s), cfg.heldout_every) for s in seqs], dtype=bool)
        local = np.arange(len(seqs))
        local_ordered = np.concatenate([local[~held], local[held]])  # training sequences first
        rows = (local_ordered[:, None] * cfg.ctx + np.arange(cfg.ctx)).ravel()  # rows of this shard's chunk
        flat = rows.astype(np.int64)
        names = shard_files(index)
        n_train = int((~held).sum()) * cfg.ctx
        record = {"index": index, "seq_start": int(seq_start), "n_seqs": len(seqs), "n_tokens": len(rows),
                  "n_train": n_train, "norm_sum": {}, "files": {}}
        arrays = {"ids": chunk.ids[:len(seqs) * cfg.ctx].reshape(len(seqs), cfg.ctx), "pos": flat,
                  "a": chunk.acts_a[rows], "b": chunk.acts_b[rows]}
        for src in ("a", "b"):
            record["norm_sum"][src] = float(np.linalg.norm(arrays[src][:n_train], axis=1).sum(dtype=np.float64))
        for key, array in arrays.items():
            record["files"][names[key]] = atomic_save_npy(out / names[key], array)
        manifest["shards"].append(record)
    finish_manifest(manifest, {"a": cfg.d_a, "b": cfg.d_b})
    write_manifest(out, manifest)
    return out


def planted_sae(dictionary: np.ndarray, mean: np.ndarray, k: int, jitter: float = 0.0, seed: int = 0):
    """A sae-lens TopK SAE whose decoder is ``dictionary`` (optionally jittered): exact directions.

    Encoder = decoder transposed (so a feature's activation approximates its generating
    coefficient, up to interference from the other active features in superposition; on the
    default config its FVU is about 0.25), ``b_dec`` = the model's mean; ``jitter`` adds Gaussian noise of that relative
    size to each decoder row before renormalizing, so cosines are below 1 as with trained SAEs.
    """
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig

    rng = np.random.default_rng(seed)
    dec = dictionary.astype(np.float64)
    if jitter > 0:
        dec = _unit_rows(dec + jitter * rng.standard_normal(dec.shape) / math.sqrt(dec.shape[1]))
    sae = TopKSAE(TopKSAEConfig(d_in=dictionary.shape[1], d_sae=dictionary.shape[0], k=k))
    with torch.no_grad():
        sae.W_dec.copy_(torch.from_numpy(dec).float())
        sae.W_enc.copy_(torch.from_numpy(dec.T).float())
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.from_numpy(mean).float())
    sae.cfg.metadata.hook_name = PLANTED_HOOK
    return sae


def write_planted_saes(pair: PlantedPair, dir_a: str | Path, dir_b: str | Path, k: int | None = None,
                       jitter: float = 0.0) -> tuple[Path, Path]:
    """Save sae-lens SAEs for A and B (decoders = the generating dictionaries) in sae-lens's format.

    ``k`` defaults to the mean number of active features, rounded (more adds interference). Both SAEs read raw
    activations; their feature activations are in the units of ``codes_a`` / ``codes_b``.
    """
    cfg = pair.config
    k = k if k is not None else max(1, round(cfg.k))
    paths = []
    for src, dictionary, mean, out in (("a", pair.dict_a, pair.mean_a, dir_a), ("b", pair.dict_b, pair.mean_b, dir_b)):
        sae = planted_sae(dictionary, mean, k=min(k, len(dictionary)), jitter=jitter, seed=cfg.seed + (src == "b"))
        sae.cfg.metadata.model_name = f"planted:{src}"
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        sae.save_model(str(out))
        paths.append(out)
    return paths[0], paths[1]
