"""The measures of one pair of latent spaces, both directions (every one scored on held-out inputs).

Inputs: ``za``, ``zb`` latents of models A and B on the same *map-train* inputs and ``za_te``,
``zb_te`` on the same *held-out* inputs (rows are inputs).

=================  =================================================================================
lin_r2_ab / _ba    held-out FVE (pooled R², :mod:`diffkit.metrics`) of the affine least-squares map
                   A→B / B→A (:class:`diffkit.linear_map.LinearMap`, ``lstsq``) fitted on the train rows
lin_mse_ab / _ba   held-out mean squared error of that map, per coordinate (latent units)
mlp_r2_ab / _ba    held-out FVE of a one-hidden-layer MLP map (128 ReLU units, each side centered and
                   scaled by one global std, full-batch Adam on ≤ 4,000 rows, 400 steps, weight decay 1e-4); ``gap_* = mlp_r2 − lin_r2``: how much
                   a nonlinear map adds (≤ 0: none, the MLP only overfits)
perm_r2_ab / _ba   held-out FVE of the best *one-to-one* map: the optimal assignment (Hungarian,
                   :func:`diffkit.matching.assign_dense`) on |Pearson correlation| of the train latents,
                   then one affine 1-D regression per matched pair (an unmatched target dim gets its mean)
one_to_one         perm_r2 / lin_r2 (mean of both directions): 1 when the correspondence is a
                   permutation of units, small when it is mixed across units
match_corr         mean |correlation| of the assigned pairs of live units (held-out)
cca, svcca         mean canonical correlation of the live units (all min(alive_a, alive_b) directions)
                   and SVCCA (99% variance)
cka                linear CKA
eff_dim            canonical correlations ≥ 0.5: the dimension of the mappable subspace
alive_a, alive_b   live latent units: non-zero variance on train and held-out inputs (a ReLU unit can be dead)
pr_a, pr_b         participation ratio of each latent space
fit_units_ab / _ba target units the linear map predicts with held-out FVE ≥ 0.5 (per unit)
=================  =================================================================================

CCA, SVCCA and CKA are computed on the held-out latents and are biased upwards by about
sqrt(d / N) for independent data (N = 597 held-out inputs): read them against the untrained floor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..linear_map import LinearMap
from ..matching import assign_dense, cosine_matrix
from ..metrics import (ErrorSums, canonical_correlations, effective_dimension, fve, linear_cka,
                       participation_ratio, svcca)

EFF_DIM_THRESHOLD = 0.5
MLP_HIDDEN = 128
MLP_STEPS = 400
FIT_UNIT_FVE = 0.5  # a target unit counts as predicted at held-out FVE >= this
MLP_MAX_ROWS = 4000  # the MLP map trains on at most this many rows (a random subset)


@dataclass
class PairResult:
    scores: dict            # the table columns of the module docstring
    corr: np.ndarray        # (d_a, d_b) held-out Pearson correlations
    perm_b: np.ndarray      # perm_b[i]: B unit assigned to A unit i (-1: none)
    rho: np.ndarray         # canonical correlations, descending
    lmap: LinearMap
    fve_per_dim_ab: np.ndarray  # held-out FVE of each B unit under the linear map A→B


def alive(z: np.ndarray, z_te: np.ndarray) -> np.ndarray:
    """Mask of units with non-zero variance on both the train and the held-out inputs."""
    return (z.std(0) > 1e-8) & (z_te.std(0) > 1e-8)


def correlation_matrix(za: np.ndarray, zb: np.ndarray) -> np.ndarray:
    """(d_a, d_b) Pearson correlations of the columns (0 where a column is constant)."""
    return cosine_matrix((za - za.mean(0)).T, (zb - zb.mean(0)).T).astype(np.float64)


def mlp_map_r2(x: np.ndarray, y: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, seed: int = 0,
               steps: int = MLP_STEPS) -> float:
    """Held-out FVE of a one-hidden-layer MLP regression y ≈ f(x) (module docstring)."""
    import torch

    torch.manual_seed(seed)
    # one scale per side, not per unit: a unit almost dead on the train inputs would blow up otherwise
    if len(x) > MLP_MAX_ROWS:
        keep = np.random.default_rng(seed).choice(len(x), MLP_MAX_ROWS, replace=False)
        x, y = x[keep], y[keep]
    mu, sd = x.mean(0), np.sqrt(x.var(0).mean()) + 1e-12
    ym, ys = y.mean(0), np.sqrt(y.var(0).mean()) + 1e-12
    xt = torch.as_tensor((x - mu) / sd, dtype=torch.float32)
    yt = torch.as_tensor((y - ym) / ys, dtype=torch.float32)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], MLP_HIDDEN), torch.nn.ReLU(),
                              torch.nn.Linear(MLP_HIDDEN, y.shape[1]))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = ((net(xt) - yt) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = net(torch.as_tensor((x_te - mu) / sd, dtype=torch.float32)).double().numpy() * ys + ym
    return fve(y_te, pred)


def one_to_one_r2(x: np.ndarray, y: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, pair_x: np.ndarray,
                  pair_y: np.ndarray) -> float:
    """Held-out FVE of predicting each y unit from its assigned x unit alone (1-D affine fits on train)."""
    pred = np.tile(y.mean(0), (len(y_te), 1))
    for i, j in zip(pair_x, pair_y):
        vx = x[:, i].var()
        if vx > 0:
            beta = np.mean((x[:, i] - x[:, i].mean()) * (y[:, j] - y[:, j].mean())) / vx
            pred[:, j] = y[:, j].mean() + beta * (x_te[:, i] - x[:, i].mean())
    sums = ErrorSums.zeros(y.shape[1])
    sums.add(y_te, pred)
    return sums.fve()


def compare(za: np.ndarray, zb: np.ndarray, za_te: np.ndarray, zb_te: np.ndarray, seed: int = 0,
            mlp_steps: int = MLP_STEPS) -> PairResult:
    """All measures of one pair (module docstring); ``mlp_steps=0`` skips the nonlinear map (NaN)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the < 10·d tokens warning: the held-out score is what is reported
        lmap = LinearMap().fit_arrays(za, zb, za_te, zb_te)
    s: dict[str, Any] = {"lin_r2_ab": lmap.scores_["a_to_b"]["heldout_fve"],
                         "lin_r2_ba": lmap.scores_["b_to_a"]["heldout_fve"],
                         "lin_mse_ab": float(np.mean((lmap.predict_b(za_te) - zb_te) ** 2)),
                         "lin_mse_ba": float(np.mean((lmap.predict_a(zb_te) - za_te) ** 2))}
    for d, (x, y, xt, yt) in (("ab", (za, zb, za_te, zb_te)), ("ba", (zb, za, zb_te, za_te))):
        s[f"mlp_r2_{d}"] = mlp_map_r2(x, y, xt, yt, seed, mlp_steps) if mlp_steps else float("nan")
        s[f"gap_{d}"] = s[f"mlp_r2_{d}"] - s[f"lin_r2_{d}"]
    asg = assign_dense(np.abs(correlation_matrix(za, zb)), threshold=0.5)
    s["perm_r2_ab"] = one_to_one_r2(za, zb, za_te, zb_te, asg.pair_a, asg.pair_b)
    s["perm_r2_ba"] = one_to_one_r2(zb, za, zb_te, za_te, asg.pair_b, asg.pair_a)
    lin = (s["lin_r2_ab"] + s["lin_r2_ba"]) / 2
    s["one_to_one"] = (s["perm_r2_ab"] + s["perm_r2_ba"]) / 2 / lin if lin > 0 else float("nan")
    corr = correlation_matrix(za_te, zb_te)
    live_a, live_b = alive(za, za_te), alive(zb, zb_te)
    both = live_a[asg.pair_a] & live_b[asg.pair_b]
    s["match_corr"] = float(np.abs(corr[asg.pair_a[both], asg.pair_b[both]]).mean()) if both.any() else 0.0
    rho = canonical_correlations(za_te[:, live_a], zb_te[:, live_b])
    s.update(cca=float(rho.mean()), svcca=svcca(za_te, zb_te), cka=linear_cka(za_te, zb_te),
             eff_dim=effective_dimension(rho, EFF_DIM_THRESHOLD),
             alive_a=int(live_a.sum()), alive_b=int(live_b.sum()),
             pr_a=participation_ratio(za_te), pr_b=participation_ratio(zb_te))
    for d, key in (("ab", "a_to_b"), ("ba", "b_to_a")):
        per = np.array([np.nan if v is None else v for v in lmap.scores_[key]["heldout_fve_per_dim"]])
        s[f"fit_units_{d}"] = int((per >= FIT_UNIT_FVE).sum())
    perm_b = np.full(za.shape[1], -1, dtype=np.int64)
    perm_b[asg.pair_a] = asg.pair_b
    per_dim = np.array([np.nan if v is None else v for v in lmap.scores_["a_to_b"]["heldout_fve_per_dim"]])
    return PairResult(s, corr, perm_b, rho, lmap, per_dim)
