"""The bridge between a crosscoder and two SAEs, and how far two methods agree on exclusive features.

Live crosscoder latents are matched one-to-one to each SAE's features by the cosine of their
decoder directions in that model's space (:func:`diffkit.matching.assign`), then the FeatureDiff's
verdict and the crosscoder's are compared on the same SAE features (:func:`agreement`).

Bridge table (one row per SAE feature of each side ``s`` ∈ {a, b}):

==================  ==============================================================================
side, feature       the SAE and its feature index
align_kind          ``shared`` / ``a_only`` / ``b_only`` (the FeatureDiff's verdict)
align_flag          the feature is exclusive to its side per the FeatureDiff (``s_only``; the calibrated
                    ``verdict`` when both tables have one, :mod:`diffkit.calibrate`)
align_q, cc_q       q-values of the two calls (NaN when not calibrated or not in the tested family)
align_excl          1 − similarity of the pair the assignment made (1 when it got no partner):
                    the training-free method's exclusivity score
act_mass_log_ratio    the FeatureDiff's signed strength difference of a shared pair, log(A/B) centred (NaN otherwise)
latent              crosscoder latent matched to the feature (−1: none at ``bridge_threshold``)
bridge_cos          cos(W_dec_cc[latent, s-block], W_dec_SAE_s[feature]) of the assigned pair
cc_r                the latent's relative decoder norm r = n_B / (n_A + n_B)
cc_label            the latent's label from the analysis (A-only r ≤ 0.1, B-only r ≥ 0.9, ...; its calibrated
                    verdict, with ``unconfirmed``, when both tables are calibrated)
cc_flag             the latent is exclusive to side ``s`` (A-only for a, B-only for b; calibrated
                    ``verdict`` as for align_flag)
cc_excl             the latent's share of side ``s``: 1 − r for a, r for b (crosscoder exclusivity)
==================  ==============================================================================

Agreement, per side, over the SAE features with a bridge partner (formulas in ``comparison.json``):
precision of the FeatureDiff's flags against the crosscoder's (``|both| / |align flags|``) and recall
(``|both| / |crosscoder flags|``) — the crosscoder's precision and recall against the FeatureDiff are
the same two numbers swapped; Spearman ρ of ``align_excl`` and ``cc_excl``; precision@k = overlap of
the top-k by each score over k. Over shared pairs (i, j) whose two features map to the *same*
latent ("consistent" pairs), Spearman ρ of ``act_mass_log_ratio`` with (n_A − n_B)/(n_A + n_B).
"""

from __future__ import annotations

from typing import Any

import numpy as np

SIDES = ("a", "b")


def bridge_side(cc_dirs: np.ndarray, live: np.ndarray, sae_dirs: np.ndarray, threshold: float) -> tuple:
    """Assign live latents (rows of ``cc_dirs[live]``) to SAE features; per feature: latent (−1) and cosine."""
    from .matching import assign

    asg = assign(cc_dirs[live], sae_dirs, threshold, solver="auto")
    latent = np.full(len(sae_dirs), -1, dtype=np.int64)
    cos = np.full(len(sae_dirs), np.nan)
    cos[asg.pair_b] = asg.similarity
    ok = asg.matched
    latent[asg.pair_b[ok]] = live[asg.pair_a[ok]]
    return latent, cos


def bridge_table(align_table: Any, latents: Any, latent_by_side: dict, cos_by_side: dict, n_features: dict) -> Any:
    import pandas as pd

    r = latents["rel_norm_r_b"].to_numpy()
    calibrated = "verdict" in align_table and "verdict" in latents
    labels = latents["verdict" if calibrated else "label"].to_numpy()
    cc_q = latents["q_exclusive"].to_numpy(np.float64) if calibrated else np.full(len(latents), np.nan)
    parts = []
    for side in SIDES:
        n = n_features[side]
        col = f"feature_{side}"
        rows = align_table[align_table[col] >= 0].set_index(col).reindex(np.arange(n))
        sim = rows["similarity"].to_numpy(dtype=np.float64)
        lat = latent_by_side[side]
        has = lat >= 0
        cc_r = np.where(has, r[np.maximum(lat, 0)], np.nan)
        df = pd.DataFrame({
            "side": side, "feature": np.arange(n), "align_kind": rows["kind"].to_numpy(),
            # Calibrated calls when both tables have them (diffkit.calibrate), the raw verdicts otherwise.
            "align_flag": rows["verdict" if calibrated else "kind"].to_numpy() == f"{side}_only",
            "align_q": rows["q_exclusive"].to_numpy(np.float64) if calibrated else np.full(n, np.nan),
            "align_excl": np.where(np.isfinite(sim), 1.0 - sim, 1.0),
            "act_mass_log_ratio": (rows["act_mass_log_ratio"].to_numpy(dtype=np.float64)  # absent in older tables
                                   if "act_mass_log_ratio" in rows else np.full(n, np.nan)),
            "partner": rows["feature_b" if side == "a" else "feature_a"].to_numpy(),
            "latent": lat, "bridge_cos": cos_by_side[side], "cc_r": cc_r,
            "cc_label": np.where(has, labels[np.maximum(lat, 0)], ""),
            "cc_flag": has & (labels[np.maximum(lat, 0)] == ("A-only" if side == "a" else "B-only")),
            "cc_q": np.where(has, cc_q[np.maximum(lat, 0)], np.nan),
            "cc_excl": (1.0 - cc_r) if side == "a" else cc_r})
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def precision_at_k(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """For k = 1..n: |top-k of x ∩ top-k of y| / k (ties broken by index, stably)."""
    n = len(x)
    order_x = np.argsort(-np.asarray(x, np.float64), kind="stable")
    order_y = np.argsort(-np.asarray(y, np.float64), kind="stable")
    # An item joins the intersection at the later of its two positions: count those per k.
    pos_x, pos_y = np.empty(n, np.int64), np.empty(n, np.int64)
    pos_x[order_x], pos_y[order_y] = np.arange(n), np.arange(n)
    joins = np.bincount(np.maximum(pos_x, pos_y), minlength=n)
    return np.cumsum(joins) / np.arange(1, n + 1) if n else np.zeros(0)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def agreement(bridge: Any, align_table: Any) -> tuple[dict, Any]:
    """Per-side agreement scores and the precision@k curves (see the module docstring)."""
    import pandas as pd

    out, curves = {}, []
    for side in SIDES:
        b = bridge[(bridge.side == side)]
        m = b[b.latent >= 0]
        both = int((m.align_flag & m.cc_flag).sum())
        n_align, n_cc = int(m.align_flag.sum()), int(m.cc_flag.sum())
        p_at_k = precision_at_k(m.align_excl.to_numpy(), m.cc_excl.to_numpy())
        k_flags = n_align
        out[side] = {
            "features": int(len(b)), "bridged": int(len(m)),
            "bridge_cos_median": float(np.nanmedian(b.bridge_cos)) if len(b) else float("nan"),
            "align_flags": int(b.align_flag.sum()), "align_flags_bridged": n_align, "cc_flags_bridged": n_cc,
            "both": both, "align_only": n_align - both, "cc_only": n_cc - both,
            "neither": int(len(m)) - n_align - n_cc + both,
            "precision": _ratio(both, n_align), "recall": _ratio(both, n_cc),
            "spearman_excl": _spearman(m.align_excl, m.cc_excl),
            "precision_at_flags": float(p_at_k[k_flags - 1]) if 0 < k_flags <= len(p_at_k) else float("nan"),
            "chance_at_flags": _ratio(k_flags, len(m)),
            "precision_at_50": float(p_at_k[49]) if len(p_at_k) >= 50 else float("nan"),
        }
        curves.append(pd.DataFrame({"side": side, "k": np.arange(1, len(p_at_k) + 1), "precision_at_k": p_at_k,
                                    "chance": np.arange(1, len(p_at_k) + 1) / max(len(m), 1)}))
    a = bridge[bridge.side == "a"].set_index("feature")
    bb = bridge[bridge.side == "b"].set_index("feature")
    shared = align_table[align_table.kind == "shared"]
    la = a.latent.reindex(shared.feature_a).to_numpy()
    lb = bb.latent.reindex(shared.feature_b).to_numpy()
    consistent = (la >= 0) & (la == lb)
    cons = shared[consistent]
    r = a.cc_r.reindex(cons.feature_a).to_numpy()
    out["pairs"] = {"shared": int(len(shared)), "both_bridged": int(((la >= 0) & (lb >= 0)).sum()),
                    "consistent": int(consistent.sum()),
                    "consistent_frac": _ratio(int(consistent.sum()), len(shared)),
                    "spearman_strength": _spearman(cons.act_mass_log_ratio, 1.0 - 2.0 * r)}
    return out, pd.concat(curves, ignore_index=True)
