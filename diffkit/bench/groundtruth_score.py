"""Scoring both methods against a planted answer key: pure functions on arrays.

Formulas (stated once here; the report repeats them):

- **Recovery.** A learned latent *recovers* planted feature f when the one-to-one assignment
  (Hungarian, :func:`diffkit.matching.assign_dense`) of its decoder direction to the generating
  dictionary pairs it with f at cosine ≥ τ (``recover_threshold``). SAE latents are matched to
  their model's dictionary; a crosscoder latent is matched twice, its A block to A's dictionary
  and its B block to B's (scale-free: cosines). Every item below is a recovered latent,
  labelled by the class of the feature it recovers; coverage (recovered / planted) is reported.
- **Exclusive detection** (A-only; B-only is symmetric). Items: latents recovering an A feature
  (SAE-A latents; crosscoder latents through their A block); positives: those whose feature is
  A-only. Differentness scores: align ``1 − s`` with ``s`` the similarity of the pair the
  assignment gave the latent (matched or rejected; ``s = −1`` if it got none), so its decision
  rule "unmatched" is ``score > 1 − threshold``; crosscoder ``1 − r`` for A (``r`` for B),
  ``r = ‖d_B‖ / (‖d_A‖ + ‖d_B‖)``. AUROC: :func:`diffkit.metrics.auroc`; precision@k: the
  fraction of planted-exclusive items among the k highest scores, k = the number of positive items.
  *Found*: planted exclusive features recovered by a latent the method's rule calls exclusive,
  over all planted exclusive features (recovery and decision together).
- **Shared matching.** Over planted shared features whose A and B sides are both recovered
  (align: by SAE-A and SAE-B latents; crosscoder: by some latent's A block and some latent's B
  block): correct when align matched exactly those two latents at its threshold / when one
  crosscoder latent recovers both sides and is not labelled A-only or B-only. Precision: of the
  pairs a method calls shared whose two sides are both recovered, the fraction on one planted feature.
- **Changed strength.** Over the correct shared items: AUROC of planted-changed vs unchanged for
  align's ``|mean_act_log_ratio − median|``, its default ranking ``|act_mass_log_ratio|`` (the same
  ratio weighted by decoder norms, centred over all shared pairs) and the original method's
  ``|enc_norm_diff_robust|``, and the crosscoder's ``|r − median r|`` (medians over the same items).
- **False positives** (the seed-pair control has no exclusive features): the fraction of live
  latents (fired at least once on the store) each method calls exclusive at its default rule.
- **Default rule** (both methods calibrated, :mod:`diffkit.calibrate`): align calls a feature
  exclusive when it is unmatched at similarity threshold 0.5 *and* its retention q-value is ≤ the
  FDR (0.1; ``verdict`` ``a_only`` / ``b_only``); the crosscoder when r ≤ 0.1 or r ≥ 0.9 *and* its
  q-value is ≤ 0.1 (``verdict``). The uncalibrated rules (unmatched; r alone) are scored beside
  them (``fpr["live_uncalibrated"]``, ``detection_uncalibrated``), so the two can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..matching import assign_dense, cosine_matrix
from ..metrics import auroc

METHODS = ("align", "crosscoder")


@dataclass
class Detection:
    """Exclusive detection for one method and one side."""

    auroc: float
    precision_at_k: float
    k: int
    n_items: int
    rule_tpr: float           # fraction of positive items the method's own rule calls exclusive
    rule_fpr: float           # fraction of negative items it calls exclusive
    found: float              # planted exclusive features recovered by a latent the rule calls exclusive / planted
    curve: list[float] = field(default_factory=list)  # precision at k = 1..n_items


@dataclass
class CaseScores:
    recovered: dict           # method -> {"a": frac of A's planted features recovered, "b": ...}
    detection: dict           # method -> {"a_only": Detection, "b_only": Detection}
    matching: dict            # method -> {"accuracy", "precision", "n"}
    changed: dict             # method -> {score name -> AUROC, "median_changed", "median_unchanged", "n",
                              #            "values" (signed score per item), "is_changed"}
    fpr: dict                 # method -> {"live": frac of live latents called exclusive, "recovered": ...,
                              #            "live_uncalibrated": the same for the uncalibrated rule}
    counts: dict              # method -> {"exclusive": n called exclusive, "live": n live latents,
                              #            "unmatched": n the uncalibrated rule calls exclusive}
    detection_uncalibrated: dict = field(default_factory=dict)  # method -> {"a_only": Detection, ...}, raw rule
    auroc_retention: dict = field(default_factory=dict)  # align -> {"a_only": AUROC of 1 − retention, ...}

    def headline(self, method: str) -> dict[str, float]:
        d = self.detection[method]
        return {"auroc_a_only": d["a_only"].auroc, "auroc_b_only": d["b_only"].auroc,
                "p_at_k_a_only": d["a_only"].precision_at_k, "p_at_k_b_only": d["b_only"].precision_at_k,
                "found_a_only": d["a_only"].found, "found_b_only": d["b_only"].found,
                "match_accuracy": self.matching[method]["accuracy"], "match_precision": self.matching[method]["precision"],
                "fpr_live": self.fpr[method]["live"]}


def recover(decoder: np.ndarray, dictionary: np.ndarray, threshold: float) -> np.ndarray:
    """For each decoder row: the row of ``dictionary`` it recovers (one-to-one, cosine ≥ threshold), else −1."""
    asg = assign_dense(cosine_matrix(decoder, dictionary).astype(np.float64), threshold)
    out = np.full(len(decoder), -1, dtype=np.int64)
    out[asg.pair_a[asg.matched]] = asg.pair_b[asg.matched]
    return out


def precision_curve(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Precision at k = 1..n of the items ranked by score (highest first; ties in input order)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = np.cumsum(np.asarray(labels, bool)[order])
    return hits / np.arange(1, len(order) + 1)


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    labels = np.asarray(labels, bool)
    return auroc(scores, labels) if 0 < labels.sum() < len(labels) else float("nan")


def detection(scores: np.ndarray, rec: np.ndarray, exclusive_rows: np.ndarray, called: np.ndarray) -> Detection:
    """Items: latents with ``rec ≥ 0``; positive when their planted row is in ``exclusive_rows``."""
    items = rec >= 0
    labels = np.isin(rec[items], exclusive_rows)
    s, c = scores[items], called[items]
    curve = precision_curve(s, labels)
    k = int(labels.sum())
    return Detection(auroc=_auroc(s, labels), precision_at_k=float(curve[k - 1]) if k else float("nan"), k=k,
                     n_items=int(items.sum()),
                     rule_tpr=float(c[labels].mean()) if labels.any() else float("nan"),
                     rule_fpr=float(c[~labels].mean()) if (~labels).any() else float("nan"),
                     found=float((labels & c).sum() / len(exclusive_rows)) if len(exclusive_rows) else float("nan"),
                     curve=curve.tolist())


def _inverse(rec: np.ndarray, n: int) -> np.ndarray:
    """Planted row -> the latent recovering it (−1 if none)."""
    out = np.full(n, -1, dtype=np.int64)
    hit = rec >= 0
    out[rec[hit]] = np.nonzero(hit)[0]
    return out


def _changed(scores: dict[str, np.ndarray], changed: np.ndarray, centre: np.ndarray) -> dict:
    out: dict[str, Any] = {name: _auroc(s, changed) for name, s in scores.items()}
    out.update(median_changed=float(np.median(centre[changed])) if changed.any() else float("nan"),
               median_unchanged=float(np.median(centre[~changed])) if (~changed).any() else float("nan"),
               n=int(len(changed)), n_changed=int(changed.sum()),
               values=np.asarray(centre, np.float64).tolist(), is_changed=np.asarray(changed, bool).tolist())
    return out


def _assigned(table: Any, side: str, n: int) -> np.ndarray:
    """Per latent of ``side``: the similarity of the pair the assignment gave it (kept or rejected), −1 if none."""
    rows = table[table[f"feature_{side}"] >= 0]
    sim = np.full(n, -1.0)
    sim[rows[f"feature_{side}"].to_numpy()] = np.nan_to_num(rows.similarity.to_numpy(), nan=-1.0)
    return sim


def score_align(pair: Any, table: Any, dec_a: np.ndarray, dec_b: np.ndarray, threshold: float) -> dict:
    """Scores of the training-free diff from its saved table (``features.parquet``) and the two SAEs' decoders
    (module docstring)."""
    n_a, n_b = len(dec_a), len(dec_b)
    rec_a, rec_b = recover(dec_a, pair.dict_a, threshold), recover(dec_b, pair.dict_b, threshold)
    sim_a, sim_b = _assigned(table, "a", n_a), _assigned(table, "b", n_b)
    pairs = table[table.kind == "shared"]
    ma, mb = pairs.feature_a.to_numpy(), pairs.feature_b.to_numpy()
    raw_a, raw_b = np.ones(n_a, bool), np.ones(n_b, bool)
    raw_a[ma], raw_b[mb] = False, False
    called_a, called_b = _calibrated_calls(table, "a", n_a, raw_a), _calibrated_calls(table, "b", n_b, raw_b)
    det = {"a_only": detection(1 - sim_a, rec_a, pair.a_only, called_a),
           "b_only": detection(1 - sim_b, rec_b, pair.b_only, called_b)}
    det_raw = {"a_only": detection(1 - sim_a, rec_a, pair.a_only, raw_a),
               "b_only": detection(1 - sim_b, rec_b, pair.b_only, raw_b)}
    # Shared matching.
    la, lb = _inverse(rec_a, len(pair.dict_a)), _inverse(rec_b, len(pair.dict_b))
    both = (la[pair.shared_a] >= 0) & (lb[pair.shared_b] >= 0)
    partner = np.full(n_a, -1, dtype=np.int64)
    partner[ma] = mb
    correct = partner[la[pair.shared_a[both]]] == lb[pair.shared_b[both]]
    rec_pairs = (rec_a[ma] >= 0) & (rec_b[mb] >= 0)
    right = pair.match_a_to_b[rec_a[ma[rec_pairs]]] == rec_b[mb[rec_pairs]]
    matching = {"accuracy": float(correct.mean()) if both.any() else float("nan"),
                "precision": float(right.mean()) if rec_pairs.any() else float("nan"), "n": int(both.sum())}
    # Changed strength, over correctly matched pairs.
    shared = table[table.kind == "shared"]
    good = shared[(rec_a[shared.feature_a.to_numpy()] >= 0)
                  & (pair.match_a_to_b[np.maximum(rec_a[shared.feature_a.to_numpy()], 0)]
                     == rec_b[shared.feature_b.to_numpy()])]
    is_changed = np.isin(rec_a[good.feature_a.to_numpy()], pair.changed_a)
    lr = good.mean_act_log_ratio.to_numpy()
    changed = _changed({"|mean_act_log_ratio - median|": np.abs(lr - np.median(lr)) if len(lr) else lr,
                        "|act_mass_log_ratio|": np.abs(good.act_mass_log_ratio.to_numpy()),
                        "|enc_norm_diff_robust|": np.abs(good.enc_norm_diff_robust.to_numpy())}, is_changed, lr)
    # False positives: live latents called exclusive.
    live_a, live_b = _live(table, "a", n_a), _live(table, "b", n_b)
    called = np.concatenate([called_a[live_a], called_b[live_b]])
    raw = np.concatenate([raw_a[live_a], raw_b[live_b]])
    rec_live = np.concatenate([rec_a[live_a] >= 0, rec_b[live_b] >= 0])
    return {"recovered": {"a": float((rec_a >= 0).sum() / len(pair.dict_a)),
                          "b": float((rec_b >= 0).sum() / len(pair.dict_b))},
            "detection": det, "matching": matching, "changed": changed,
            "fpr": {"live": float(called.mean()), "recovered": float(called[rec_live].mean()) if rec_live.any()
                    else float("nan"), "live_uncalibrated": float(raw.mean())},
            "counts": {"exclusive": int(called.sum()), "live": int(len(called)), "unmatched": int(raw.sum())},
            "detection_uncalibrated": det_raw, "auroc_retention": _auroc_retention(table, rec_a, rec_b, pair)}


def _auroc_retention(table: Any, rec_a: np.ndarray, rec_b: np.ndarray, pair: Any) -> dict:
    """AUROC of 1 − retention (model-level score of :mod:`diffkit.calibrate`) over the same items; NaN
    retention (own-residual R² below the floor) scores 0."""
    out = {}
    for side, rec, excl in (("a", rec_a, pair.a_only), ("b", rec_b, pair.b_only)):
        if f"r2_own_{side}" not in table:
            out[f"{side}_only"] = float("nan")
            continue
        rows = table[table[f"feature_{side}"] >= 0]
        ret = np.zeros(len(rec))
        with np.errstate(divide="ignore", invalid="ignore"):
            own, other = rows[f"r2_own_{side}"].to_numpy(), rows[f"r2_other_{side}"].to_numpy()
            val = np.where(own >= 0.05, 1 - np.clip(other, 0, None) / own, 0.0)
        ret[rows[f"feature_{side}"].to_numpy()] = np.nan_to_num(val)
        items = rec >= 0
        out[f"{side}_only"] = _auroc(ret[items], np.isin(rec[items], excl))
    return out


def _calibrated_calls(table: Any, side: str, n: int, fallback: np.ndarray) -> np.ndarray:
    """Features of ``side`` the calibrated verdict calls exclusive (the uncalibrated rule for older tables)."""
    if "verdict" not in table:
        return fallback
    called = np.zeros(n, bool)
    called[table.loc[table.verdict == f"{side}_only", f"feature_{side}"].to_numpy()] = True
    return called


def _live(table: Any, side: str, n: int) -> np.ndarray:
    rows = table[table[f"feature_{side}"] >= 0]
    live = np.zeros(n, bool)
    live[rows[f"feature_{side}"].to_numpy()] = rows[f"freq_{side}"].to_numpy() > 0
    return live


def score_crosscoder(pair: Any, latents: Any, dec_a: np.ndarray, dec_b: np.ndarray, threshold: float) -> dict:
    """Scores of the crosscoder from its LatentTable (``analyze``) and its two decoder blocks."""
    r = latents.rel_norm_r_b.to_numpy()
    raw_label = latents.label.to_numpy()
    label = latents.verdict.to_numpy() if "verdict" in latents else raw_label  # calibrated when analysed so
    rec_a, rec_b = recover(dec_a, pair.dict_a, threshold), recover(dec_b, pair.dict_b, threshold)
    det = {"a_only": detection(1 - r, rec_a, pair.a_only, label == "A-only"),
           "b_only": detection(r, rec_b, pair.b_only, label == "B-only")}
    det_raw = {"a_only": detection(1 - r, rec_a, pair.a_only, raw_label == "A-only"),
               "b_only": detection(r, rec_b, pair.b_only, raw_label == "B-only")}
    la, lb = _inverse(rec_a, len(pair.dict_a)), _inverse(rec_b, len(pair.dict_b))
    both = (la[pair.shared_a] >= 0) & (lb[pair.shared_b] >= 0)
    same = la[pair.shared_a[both]] == lb[pair.shared_b[both]]
    not_excl = ~np.isin(label, ["A-only", "B-only"])
    correct = same & not_excl[la[pair.shared_a[both]]]
    says_shared = not_excl & ~latents.dead.to_numpy()
    two = says_shared & (rec_a >= 0) & (rec_b >= 0)
    right = pair.match_a_to_b[rec_a[two]] == rec_b[two]
    matching = {"accuracy": float(correct.mean()) if both.any() else float("nan"),
                "precision": float(right.mean()) if two.any() else float("nan"), "n": int(both.sum())}
    good = la[pair.shared_a[both]][same]                    # latents recovering one planted shared feature
    is_changed = np.isin(rec_a[good], pair.changed_a)
    rg = r[good]
    changed = _changed({"|r - median r|": np.abs(rg - np.median(rg)) if len(rg) else rg}, is_changed, rg)
    live = ~latents.dead.to_numpy()
    called = np.isin(label, ["A-only", "B-only"])
    raw = np.isin(raw_label, ["A-only", "B-only"])
    rec_live = (rec_a >= 0) | (rec_b >= 0)
    return {"recovered": {"a": float((rec_a >= 0).sum() / len(pair.dict_a)),
                          "b": float((rec_b >= 0).sum() / len(pair.dict_b))},
            "detection": det, "matching": matching, "changed": changed,
            "fpr": {"live": float(called[live].mean()) if live.any() else float("nan"),
                    "recovered": float(called[live & rec_live].mean()) if (live & rec_live).any() else float("nan"),
                    "live_uncalibrated": float(raw[live].mean()) if live.any() else float("nan")},
            "counts": {"exclusive": int(called[live].sum()), "live": int(live.sum()), "unmatched": int(raw[live].sum())},
            "detection_uncalibrated": det_raw, "auroc_retention": {}}


def score_case(pair: Any, table: Any, sae_decoders: tuple, latents: Any, cc_decoders: tuple,
               threshold: float) -> CaseScores:
    """Both methods' scores: align's from its table, the crosscoder's from its LatentTable; decoders are
    (A, B) numpy arrays with latents as rows."""
    parts = {"align": score_align(pair, table, *sae_decoders, threshold),
             "crosscoder": score_crosscoder(pair, latents, *cc_decoders, threshold)}
    return CaseScores(**{key: {m: parts[m][key] for m in METHODS}
                         for key in ("recovered", "detection", "matching", "changed", "fpr", "counts",
                                     "detection_uncalibrated", "auroc_retention")})
