"""Experiment 6, ``scale-up``: deeper models, the zoo's attention models, and how a map generalizes.

Toy part (standard conditions): a seed pair of 4-hidden-layer MLPs compared layer by layer, and a
seed pair of the default MLP with its map fitted on the latents of digits 0–4 only, scored on
held-out 0–4 (in distribution) and on held-out 5–9 (inputs of classes the map never saw).

Zoo part: residual activations at the zoo's SAE hook of ``zoo:base`` against ``zoo:base-seed1``
(another seed) and ``zoo:finetuned`` (base fine-tuned on Python code) on the ``prose`` and the
``code`` corpus (each store's own held-out sequences score the maps). The code store, the
training-free diff on it (:func:`diffkit.diff.align`, the zoo SAEs, default threshold) and a small
BatchTopK crosscoder (1,024 latents, 200k tokens: seconds per pair on one thread; its held-out FVE
and how many latents its relative norm calls exclusive) are the pipeline on the packaged ``scaleup``
config; the prose store is collected beside it. Per pair: the measures of
:mod:`~diffkit.experiments.measures` on each corpus, and the linear map fitted on one corpus and
scored on the other. ``diffkit demo`` trains the full-size zoo crosscoder (4,096 latents, 600k
tokens) and compares the two methods.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from .common import Condition
from .nets import NetSpec
from .report import fmt, write_csv
from .runner import mean_r2, run_standard

TITLE = "deeper models, the zoo's attention models, and map generalization"
HYPOTHESIS = ("The toy findings carry over: every layer of a deeper seed pair maps linearly (R² ≥ 0.9); on the "
              "zoo's transformers the fine-tune maps onto its base better than an independently seeded model "
              "does; and a map fitted on one input subset loses R² on another (a generalization gap > 0).")
ZOO_PAIRS = ("base-seed1", "finetuned")
CORPORA = ("prose", "code")
DEEP = 4
GEN = ("map fit 0–4, scored 0–4", "map fit 0–4, scored 5–9")


def conditions() -> list[Condition]:
    deep = NetSpec(depth=DEEP)
    layers = [Condition(f"depth-{DEEP} seeds, layer {i + 1}", i + 1, deep, deep, layer=i) for i in range(DEEP)]
    layers.append(Condition(f"depth-{DEEP} seeds, latent", DEEP + 1, deep, deep))
    mlp = NetSpec()
    return layers + [Condition(GEN[0], DEEP + 2, mlp, mlp, train_set="0-4", eval_set="0-4"),
                     Condition(GEN[1], DEEP + 3, mlp, mlp, train_set="0-4", eval_set="5-9")]


def _arrays(store, split: str) -> tuple[np.ndarray, np.ndarray]:
    a, b = zip(*store.iter_shards(split))
    return np.concatenate(a).astype(np.float64), np.concatenate(b).astype(np.float64)


def zoo_part(cfg, log) -> dict:
    """Per zoo pair: the packaged ``scaleup`` pipeline config (collect the code store, align with the zoo
    SAEs, the small crosscoder, compare) in a temporary work folder, a prose store collected beside it,
    and every measure (module docstring)."""
    import torch

    from ..activations import ActivationStore, CollectConfig, collect_activations
    from ..compare import load_comparison
    from ..linear_map import LinearMap
    from ..pipeline.config import load_config, packaged
    from ..pipeline.runner import run_pipeline
    from ..zoo import SAE_HOOK
    from .measures import compare

    rows, gen, diffs = [], [], []
    with tempfile.TemporaryDirectory(prefix="diffkit-exp-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for b in ZOO_PAIRS:
            t = time.perf_counter()
            work = Path(tmp) / b
            pcfg = load_config(packaged("scaleup"), {
                "work": str(work), "threads": torch.get_num_threads(), "models.b": f"zoo:{b}", "saes.b": f"zoo:{b}",
                "data.hook": SAE_HOOK, "data.tokens": cfg.zoo_tokens})
            result = run_pipeline(pcfg, log=lambda _: None, progress=False, command="diffkit experiment scale-up")
            prose = Path(tmp) / f"{b}-prose"
            collect_activations(CollectConfig(model_a="zoo:base", model_b=f"zoo:{b}", hook_a=SAE_HOOK, hook_b=SAE_HOOK,
                                              corpus="prose", tokens=cfg.zoo_tokens), prose, progress=False)
            stores = {"prose": ActivationStore.open(prose), "code": ActivationStore.open(work / "store-diff")}
            data = {}
            for corpus in CORPORA:
                data[corpus] = (*_arrays(stores[corpus], "train"), *_arrays(stores[corpus], "heldout"))
                res = compare(*data[corpus], seed=0, mlp_steps=cfg.mlp_steps)
                rows.append({"pair": f"base vs {b}", "corpus": corpus, "train_tokens": len(data[corpus][0]),
                             "heldout_tokens": len(data[corpus][2]), **res.scores})
            for fit_on, score_on in (("prose", "prose"), ("prose", "code"), ("code", "code"), ("code", "prose")):
                m = LinearMap().fit_arrays(data[fit_on][0], data[fit_on][1], data[score_on][2], data[score_on][3])
                gen.append({"pair": f"base vs {b}", "fit_on": fit_on, "scored_on": score_on,
                            "lin_r2_ab": m.scores_["a_to_b"]["heldout_fve"],
                            "lin_r2_ba": m.scores_["b_to_a"]["heldout_fve"]})
            c, lmap = result["align"]["diff"]["counts"], LinearMap.load(result["map"]["maps"]["diff"])
            analysis = load_comparison(work / "compare-diff").summary["analysis"]
            n = analysis["counts"]
            diffs.append({"pair": f"base vs {b}", "store": "code", "shared": c["shared"], "a_only": c["a_only"],
                          "b_only": c["b_only"], "threshold": result["align"]["diff"]["threshold"],
                          "map_fve_ab": lmap.scores_["a_to_b"]["heldout_fve"], "cc_fve_a": analysis["fve_a"],
                          "cc_fve_b": analysis["fve_b"], "cc_a_only": n.get("a_only", 0),
                          "cc_b_only": n.get("b_only", 0), "cc_shared": n.get("shared", 0),
                          "cc_dead_frac": analysis["dead_frac"]})
            log(f"    zoo base vs {b}: linear R² A→B (code) {rows[-1]['lin_r2_ab']:.3f}, "
                f"{c['shared']} shared SAE features ({time.perf_counter() - t:.1f} s)")
    return {"rows": rows, "gen": gen, "diffs": diffs}


def _gen_r2(zoo: dict, pair: str, fit_on: str, score_on: str) -> float:
    g = next(g for g in zoo["gen"] if g["pair"] == pair and g["fit_on"] == fit_on and g["scored_on"] == score_on)
    return (g["lin_r2_ab"] + g["lin_r2_ba"]) / 2


def judge_with(zoo: dict):
    def judge(s: dict) -> tuple[str, str, dict]:
        layers = [mean_r2(s[k]) for k in s if k.startswith(f"depth-{DEEP}")]
        toy_gap = mean_r2(s[GEN[0]]) - mean_r2(s[GEN[1]])
        if zoo is None:
            held = "held" if min(layers) >= 0.9 and toy_gap > 0 else "partly"
            return held, ("Toy part only (--quick skips the zoo): linear R² per layer "
                          + " → ".join(f"{v:.3f}" for v in layers) + f"; map generalization gap {toy_gap:+.3f}."), \
                {"deep layers min R²": min(layers), "toy map gap": toy_gap}
        zr = {(r["pair"], r["corpus"]): (r["lin_r2_ab"] + r["lin_r2_ba"]) / 2 for r in zoo["rows"]}
        seed_code, ft_code = zr[("base vs base-seed1", "code")], zr[("base vs finetuned", "code")]
        zoo_gap = {p: _gen_r2(zoo, p, "prose", "prose") - _gen_r2(zoo, p, "prose", "code")
                   for p in ("base vs base-seed1", "base vs finetuned")}
        checks = [min(layers) >= 0.9, ft_code > seed_code, toy_gap > 0 and min(zoo_gap.values()) > 0]
        held = "held" if all(checks) else "partly" if any(checks) else "did not hold"
        verdict = (f"Depth-{DEEP} seed pair, linear R² per layer (first → latent): "
                   + " → ".join(f"{v:.3f}" for v in layers)
                   + f". Map fitted on digits 0–4: R² {mean_r2(s[GEN[0]]):.3f} on 0–4, {mean_r2(s[GEN[1]]):.3f} on 5–9"
                   f" (gap {toy_gap:+.3f}). Zoo (code store, mean of both directions): base vs base-seed1 "
                   f"{seed_code:.3f}, base vs finetuned {ft_code:.3f}; prose-fitted map scored on code loses "
                   + ", ".join(f"{v:+.3f} ({p})" for p, v in zoo_gap.items()) + ". Training-free diff (code): "
                   + ", ".join(f"{d['pair']} {d['shared']} shared / {d['a_only']} A-only" for d in zoo["diffs"])
                   + "; crosscoder A-only / B-only latents: "
                   + ", ".join(f"{d['pair']} {d['cc_a_only']} / {d['cc_b_only']}" for d in zoo["diffs"]) + ".")
        return held, verdict, {"deep layers min R²": min(layers), "toy map gap": toy_gap,
                               "zoo seed R² (code)": seed_code, "zoo finetune R² (code)": ft_code}
    return judge


def extra_with(zoo: dict):
    def extra(result, out, command):
        if zoo is None:
            return ["## The zoo's attention models", "", "Skipped: `--quick` runs the toy part only."]
        write_csv(out / "tables" / "zoo_pairs.csv", zoo["rows"], command)
        write_csv(out / "tables" / "zoo_generalization.csv", zoo["gen"], command)
        write_csv(out / "tables" / "zoo_align.csv", zoo["diffs"], command)
        lines = ["## The zoo's attention models (residual stream at the SAE hook, d_model 128)", "",
                 f"Tables: `tables/zoo_pairs.csv`, `tables/zoo_generalization.csv`, `tables/zoo_align.csv` "
                 f"(`{command}`). One store per corpus, ~{result.cfg.zoo_tokens:,} tokens each (every 10th "
                 "sequence held out); one run (the zoo has one model per recipe, so no spread).", "",
                 "| pair | corpus | lin R² A→B | lin R² B→A | MLP R² A→B | MLP R² B→A | SVCCA | mean CCA | CKA | "
                 "eff. dim | 1-to-1 / lin |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in zoo["rows"]:
            lines.append(f"| {r['pair']} | {r['corpus']} | " + " | ".join(
                fmt(r[k]) for k in ("lin_r2_ab", "lin_r2_ba", "mlp_r2_ab", "mlp_r2_ba", "svcca", "cca", "cka"))
                + f" | {r['eff_dim']} | {fmt(r['one_to_one'])} |")
        lines += ["", "**Generalization of the map** (linear, fitted on one corpus's train tokens, scored on a "
                  "corpus's held-out tokens):", "", "| pair | fit on | scored on | lin R² A→B | lin R² B→A |",
                  "|---|---|---|---|---|"]
        lines += [f"| {g['pair']} | {g['fit_on']} | {g['scored_on']} | {fmt(g['lin_r2_ab'])} | {fmt(g['lin_r2_ba'])} |"
                  for g in zoo["gen"]]
        from ..pipeline.config import load_config, packaged

        cc = load_config(packaged("scaleup")).crosscoder
        lines += ["", "**Training-free diff and crosscoder on the code store.** `diffkit align` defaults (lstsq map, "
                  "cosine cost, threshold 0.5; the zoo SAEs have 1,024 features) and a BatchTopK crosscoder of "
                  f"{cc.dict_size:,} latents, k = {cc.k}, {cc.tokens:,} training tokens (labels from its "
                  "relative norm r = n_B/(n_A+n_B): A-only r ≤ 0.1, B-only r ≥ 0.9, shared 0.3–0.7; FVE on held-out "
                  "tokens):", "",
                  "| pair | align shared | align A-only | align B-only | map FVE A→B | crosscoder FVE A / B | "
                  "crosscoder A-only / B-only / shared | crosscoder dead |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {d['pair']} | {d['shared']} | {d['a_only']} | {d['b_only']} | {fmt(d['map_fve_ab'])} | "
                  f"{fmt(d['cc_fve_a'])} / {fmt(d['cc_fve_b'])} | {d['cc_a_only']} / {d['cc_b_only']} / "
                  f"{d['cc_shared']} | {100 * d['cc_dead_frac']:.0f}% |" for d in zoo["diffs"]]
        return lines
    return extra


def run(cfg, out, cache, log):
    zoo = None
    if not cfg.quick:
        log("    zoo: collect activations, fit maps, align SAEs, train a small crosscoder")
        zoo = zoo_part(cfg, log)
    intro = [f"Toy: a seed pair of {DEEP}-hidden-layer MLP classifiers (64→128×{DEEP}→32) compared at every "
             "layer, and the map's generalization to classes it was not fitted on. Zoo: the embedded 2-layer "
             "transformers (see below)."]
    return run_standard(cfg, out, cache, log, conditions(), TITLE, intro, HYPOTHESIS, judge_with(zoo),
                        extra_with(zoo))
