"""Experiment 1, ``seeds``: same architecture, data and hyper-parameters, different random seeds.

Controls on both sides of the seed pairs: the planted ceiling (a network and an exact copy of it
with its latent units permuted) and the floor (a trained network against one at initialisation).
"""

from __future__ import annotations

from .common import Condition
from .nets import NetSpec
from .runner import mean_r2, run_standard

TITLE = "different random seeds"
HYPOTHESIS = ("Networks that differ only in their seed learn the same latent space up to a linear map: held-out "
              "R² close to the planted permuted copy (1.0) and far above the untrained floor — but not up to a "
              "permutation of units: the best one-to-one map explains clearly less than the linear one.")


def conditions() -> list[Condition]:
    mlp = NetSpec()
    return [Condition("permuted copy (planted)", 0, mlp, mlp, permuted=True),
            Condition("seed pair, MLP", 1, mlp, mlp),
            Condition("seed pair, CNN", 1, NetSpec(arch="cnn"), NetSpec(arch="cnn")),
            Condition("seed pair, autoencoder", 1, NetSpec(objective="autoencode"), NetSpec(objective="autoencode")),
            Condition("untrained B (floor)", 2, mlp, NetSpec(trained=False))]


def judge(s: dict) -> tuple[str, str, dict]:
    planted, floor = s["permuted copy (planted)"], s["untrained B (floor)"]
    pairs = [s[k] for k in ("seed pair, MLP", "seed pair, CNN", "seed pair, autoencoder")]
    lin = min(mean_r2(p) for p in pairs)
    o2o = max(p["one_to_one"] for p in pairs)
    ok_linear = lin >= 0.9 and lin > mean_r2(floor) + 0.1
    held = "held" if ok_linear and o2o < 0.9 else "partly" if ok_linear or o2o < 0.9 else "did not hold"
    verdict = (f"Seed pairs map linearly with held-out R² ≥ {lin:.3f} (mean of both directions, worst of MLP / CNN "
               f"/ autoencoder; planted copy {mean_r2(planted):.3f}, untrained floor {mean_r2(floor):.3f}); the "
               f"one-to-one map reaches at most {o2o:.2f} of the linear R² (planted copy "
               f"{planted['one_to_one']:.2f}), so the shared space is mixed across units, not permuted.")
    return held, verdict, {"seed-pair lin R² (worst)": lin, "1-to-1/lin (best)": o2o,
                           "floor lin R²": mean_r2(floor), "planted lin R²": mean_r2(planted)}


def run(cfg, out, cache, log):
    intro = ["Same architecture (MLP 64→128→32, ReLU), data (all digits) and training recipe; only the seed "
             "differs. A planted ceiling (A and an exactly permuted copy of A) and an untrained floor frame the "
             "seed pairs, for an MLP, a small CNN and an autoencoder."]
    return run_standard(cfg, out, cache, log, conditions(), TITLE, intro, HYPOTHESIS, judge)
