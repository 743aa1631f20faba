"""Fuzz pass over every file reader: each damaged input is rejected with a one-line DiffkitError, or loads
to exactly the data of the undamaged artifact -- never a traceback, never a silent wrong result.

Artifacts are real: a store collected from two TransformerLens checkpoints, sae-lens TopK SAEs saved
with ``save_model``, a fitted LinearMap, a FeatureDiff from ``align``, a crosscoder trained with
checkpoints, and a diffkit model checkpoint. Two passes per reader:

- named cases (parametrized): malformed JSON, missing fields, wrong types and versions, counts that
  do not add up, truncated / missing / wrong-dtype / wrong-shape tensors, garbage headers;
- a seeded random mutation pass: bytes flipped, truncated, inserted or deleted, and JSON values
  replaced by values of another type (or negative / huge numbers, or deleted).

Payload bytes of the formats that carry no checksum (sae-lens's ``sae_weights.safetensors``, a model
checkpoint's ``model.safetensors``) are excluded from byte flips: a flipped float there is a valid
file that no reader can tell from the original. Store shards are checked with ``verify="full"``
(``diffkit store verify``) for payload flips and with the default size check for everything else.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

from diffkit.errors import DiffkitError

SEED = 1234
N_RANDOM = 14  # mutations per (reader, file) in the random pass


# -- artifacts ------------------------------------------------------------------------------------
def _sae(d_in: int, hook: str, seed: int) -> Any:
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=64, k=4))
    sae.cfg.metadata.hook_name = hook
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return sae


RUN_OPTIONS: dict[str, Any] = dict(dict_size=64, k=4, batch_size=256, tokens=256 * 5, checkpoint_every=2, log_every=2,
                                   eval_tokens=256)  # the crosscoder run's command line (+ acts, set on build)


class Pristine:
    """The undamaged artifacts, each built on first use (a run of one reader's cases builds only its own)."""

    def __init__(self, store: Any, models: dict, root: Path):
        self.store, self.models, self.root, self._paths = store, models, root, {}

    def __getitem__(self, key: str) -> Path:
        if key not in self._paths:
            self._paths[key] = getattr(self, f"_build_{key}")()
        return self._paths[key]

    def _build_store(self) -> Path:
        return self.store.root

    def _build_model(self) -> Path:
        return Path(self.models["a"])

    def _build_sae(self) -> Path:
        for side, d, hook in (("a", 32, "blocks.0.hook_resid_post"), ("b", 48, "blocks.1.hook_resid_post")):
            _sae(d, hook, seed=d).save_model(str(self.root / f"sae_{side}"))
        return self.root / "sae_a"

    def _build_map(self) -> Path:
        from diffkit.linear_map import LinearMap

        return LinearMap().fit(self.store).save(self.root / "map")

    def _build_diff(self) -> Path:
        from diffkit.diff import AlignConfig, align, save_diff
        from diffkit.linear_map import LinearMap
        from diffkit.saes import load_sae

        sae_a = load_sae(str(self["sae"]))
        sae_b = load_sae(str(self.root / "sae_b"))
        diff = align(self.store, sae_a, sae_b, LinearMap.load(self["map"]), AlignConfig())
        return save_diff(diff, self.root / "diff", {"acts": str(self.store.root)})

    def _build_cc(self) -> Path:
        from baselines.crosscoder.train import TrainConfig, train

        RUN_OPTIONS["acts"] = str(self.store.root)
        train(TrainConfig(out=str(self.root / "cc"), **RUN_OPTIONS), progress=False, log=lambda _: None)
        return self.root / "cc"


@pytest.fixture(scope="module")
def pristine(small_store, tiny_models, tmp_path_factory) -> Pristine:
    return Pristine(small_store, tiny_models, tmp_path_factory.mktemp("fuzz-pristine"))


# -- readers: path -> fingerprint of what was loaded ------------------------------------------------
def read_store(path: Path, verify: str = "size") -> dict:
    from diffkit.activations import ActivationStore

    st = ActivationStore.open(path, verify=verify)
    n = st.n_tokens("all")
    a, b = st.batch(np.arange(n), split="all")
    ctx = st.contexts(np.arange(0, n, 97), split="all", window=4)
    return {"n": [st.n_tokens(s) for s in ("train", "heldout", "all")], "d": [st.d_model("a"), st.d_model("b")],
            "hooks": [st.hook("a"), st.hook("b")], "a": a, "b": b, "ctx": [(c.tolist(), o) for c, o in ctx],
            "first_batch": next(st.iter_batches(64, seed=3))}


def read_sae(path: Path) -> dict:
    from diffkit.saes import load_sae

    s = load_sae(str(path))
    x = torch.linspace(-2, 2, 8 * s.d_in).reshape(8, s.d_in)
    # A missing hook name is legal (sae-lens-trained SAEs have none): check_against_store warns and assumes
    # the store's hook. So None (a deleted or nulled hook_name) counts as the original hook here.
    hook = s.hook_name if s.hook_name is not None else "blocks.0.hook_resid_post"
    return {"facts": (s.d_in, s.d_sae, s.architecture, hook), "feats": s.encode(x, 1.0),
            "state": {k: v.detach().clone() for k, v in s.sae.state_dict().items()}}


def read_map(path: Path) -> dict:
    from diffkit.linear_map import LinearMap

    m = LinearMap.load(path)
    x = np.linspace(-1, 1, 4 * m.d_a_).reshape(4, m.d_a_)
    return {"facts": (m.method, m.alpha, m.space, m.d_a_, m.d_b_), "pred_b": m.predict_b(x),
            "W": [m.W_ab_, m.b_ab_, m.W_ba_, m.b_ba_, m.mean_a_, m.mean_b_], "scores": m.scores_}


def read_diff(path: Path) -> Any:
    from diffkit.diff import load_table

    return load_table(path)


def read_crosscoder(path: Path) -> dict:
    from baselines.crosscoder.model import load

    model = load(path)
    x = torch.linspace(-1, 1, 4 * model.cfg.d_total).reshape(4, model.cfg.d_total)
    return {"cfg": model.cfg, "state": model.state_dict(), "out": model(x, train=False).x_hat_BD.detach()}


def read_run(path: Path) -> dict:
    """What ``crosscoder train --resume`` reads, as it reads it: the saved config (checked against the
    command line's, so a changed value is refused) and the last checkpoint, restored into a model."""
    from baselines.crosscoder.model import CrossCoder
    from baselines.crosscoder.train import (TrainConfig, _prepare_out, _restore, model_config, open_store,
                                            resolve_config)

    store = open_store(RUN_OPTIONS["acts"])
    cfg = resolve_config(TrainConfig(out=str(path), **RUN_OPTIONS), store)  # as train() does before comparing
    step, tensors, info = _prepare_out(path, cfg, resume=True, rank=0)
    model = CrossCoder(model_config(cfg, store))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    since = _restore(model, opt, tensors, torch.device("cpu"))
    return {"step": step, "state": model.state_dict(), "since": since,
            "adam": [(v["exp_avg"], v["exp_avg_sq"]) for v in opt.state.values()]}


def read_model(path: Path) -> dict:
    from diffkit.models import load_checkpoint

    model, tok, _ = load_checkpoint(path)
    return {"cfg": (model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab, model.cfg.n_ctx), "tok": tok.name,
            "state": {k: v.clone() for k, v in model.state_dict().items() if not k.endswith((".IGNORE", ".mask"))}}


READERS: dict[str, tuple[str, Callable[[Path], Any]]] = {
    "store": ("store", read_store), "store_full": ("store", lambda p: read_store(p, "full")),
    "sae": ("sae", read_sae), "map": ("map", read_map), "diff": ("diff", read_diff),
    "crosscoder": ("cc", read_crosscoder), "run": ("cc", read_run), "model": ("model", read_model),
}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            bool(torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if hasattr(a, "equals"):  # DataFrame
        return a.equals(b)
    if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b):
        return True
    return type(a) is type(b) and a == b


def outcome(reader: str, path: Path, reference: Any, what: str) -> str:
    """'error' (a one-line DiffkitError) or 'ok' (equal to the reference); anything else fails the test."""
    try:
        got = READERS[reader][1](path)
    except DiffkitError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and len(msg) < 600, f"{what}: error is not one short line: {msg!r}"
        return "error"
    assert same(reference, got), f"{what}: loaded without error but the data differ (a silent wrong result)"
    return "ok"


class References(dict):
    """What each reader loads from the undamaged artifact, computed on first use."""

    def __init__(self, pristine: Pristine):
        super().__init__()
        self.pristine = pristine

    def __missing__(self, name: str) -> Any:
        key, fn = READERS[name]
        self[name] = fn(self.pristine[key])
        return self[name]


@pytest.fixture(scope="module")
def references(pristine) -> References:
    return References(pristine)


@pytest.fixture
def copy_of(pristine, tmp_path) -> Callable[[str], Path]:
    def make(key: str) -> Path:
        dst = tmp_path / key
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(pristine[key], dst)
        return dst
    return make


# -- mutations ------------------------------------------------------------------------------------
def edit_json(path: Path, fn: Callable[[Any], Any]) -> None:
    obj = json.loads(path.read_text())
    new = fn(obj)
    path.write_text(json.dumps(obj if new is None else new))


def truncate(path: Path, frac: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * frac)])


def set_at(keys: list, value: Any, delete: bool = False) -> Callable[[Any], None]:
    def fn(obj: Any) -> None:
        for k in keys[:-1]:
            obj = obj[k]
        if delete:
            del obj[keys[-1]]
        else:
            obj[keys[-1]] = value
    return fn


def rewrite_safetensors(path: Path, fn: Callable[[dict], dict]) -> None:
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in fn(dict(load_file(str(path)))).items()}, str(path))


def drop_checksum(path: Path, key: str) -> None:
    """Remove a recorded checksum, so the check behind it (shape, dtype, columns) is what fires."""
    edit_json(path, lambda obj: obj.pop(key, None) and None)


def rewrite_npy(store: Path, rel: str, array: np.ndarray) -> None:
    """Replace one shard file and update its size in the manifest (so the header check is what fires)."""
    np.save(store / rel, array)
    manifest = store / "manifest.json"
    edit_json(manifest, lambda m: [s["files"][rel].update(bytes=(store / rel).stat().st_size)
                                   for s in m["shards"] if rel in s["files"]] and None)


SHARD_A = "a/shard_00000.npy"
M = "manifest.json"


def _store_cases() -> list:
    def shards(fn):
        return lambda p: edit_json(p / M, lambda m: fn(m["shards"]))

    return [
        ("manifest truncated", lambda p: truncate(p / M)),
        ("manifest missing", lambda p: (p / M).unlink()),
        ("manifest is a list", lambda p: (p / M).write_text("[1, 2]")),
        ("manifest not utf-8", lambda p: (p / M).write_bytes(b"\xff\xfe{" * 10)),
        ("wrong version", lambda p: edit_json(p / M, set_at(["format_version"], 99))),
        ("version a string", lambda p: edit_json(p / M, set_at(["format_version"], "1"))),
        *[(f"missing {k}", lambda p, k=k: edit_json(p / M, set_at([k], None, delete=True)))
          for k in ("config", "sources", "shards", "complete", "n_tokens", "scale")],
        ("shards a dict", lambda p: edit_json(p / M, set_at(["shards"], {}))),
        ("negative n_tokens", shards(lambda s: s[0].update(n_tokens=-5))),
        ("huge n_tokens", shards(lambda s: s[0].update(n_tokens=10**30))),
        ("n_train > n_tokens", shards(lambda s: s[0].update(n_train=s[0]["n_tokens"] + 1))),
        ("n_train a string", shards(lambda s: s[0].update(n_train="12"))),
        ("last shard dropped", shards(lambda s: s.pop())),
        ("shard listed twice", shards(lambda s: s.append(dict(s[-1])))),
        ("shards swapped", shards(lambda s: s.__setitem__(slice(0, 2), [s[1], s[0]]))),
        ("shard file record missing", shards(lambda s: s[0]["files"].pop(SHARD_A))),
        ("shard file shape wrong", shards(lambda s: s[0]["files"][SHARD_A].update(shape=[1, 2]))),
        ("d_model wrong", lambda p: edit_json(p / M, set_at(["sources", "a", "d_model"], 33))),
        ("d_model huge", lambda p: edit_json(p / M, set_at(["sources", "a", "d_model"], 10**30))),
        ("hook not a string", lambda p: edit_json(p / M, set_at(["sources", "b", "hook"], 7))),
        ("scale negative", lambda p: edit_json(p / M, set_at(["scale", "a"], -1.0))),
        ("scale a string", lambda p: edit_json(p / M, set_at(["scale", "b"], "1.0"))),
        ("totals disagree", lambda p: edit_json(p / M, set_at(["n_tokens", "train"], 1))),
        ("config ctx 0", lambda p: edit_json(p / M, set_at(["config", "ctx"], 0))),
        ("config tokens negative", lambda p: edit_json(p / M, set_at(["config", "tokens"], -1))),
        ("shard missing", lambda p: (p / SHARD_A).unlink()),
        ("shard truncated", lambda p: truncate(p / SHARD_A)),
        ("shard garbage header", lambda p: (p / SHARD_A).write_bytes(
            b"\x93NUMPY\x01\x00" + b"\x07" * 60 + (p / SHARD_A).read_bytes()[68:])),
        ("shard wrong dtype", lambda p: rewrite_npy(p, SHARD_A, np.load(p / SHARD_A).astype(np.float16))),
        ("shard wrong shape", lambda p: rewrite_npy(p, SHARD_A, np.load(p / SHARD_A).T.copy())),
        ("shard fortran order", lambda p: rewrite_npy(p, SHARD_A, np.asfortranarray(np.load(p / SHARD_A)))),
        ("ids shard wrong dtype", lambda p: rewrite_npy(p, "tokens/shard_00000.ids.npy",
                                                        np.load(p / "tokens/shard_00000.ids.npy").astype(np.float32))),
    ]


SAE_CFG, SAE_W = "cfg.json", "sae_weights.safetensors"


def _sae_cases() -> list:
    return [
        ("cfg malformed", lambda p: truncate(p / SAE_CFG)),
        ("cfg missing", lambda p: (p / SAE_CFG).unlink()),
        ("cfg a list", lambda p: (p / SAE_CFG).write_text("[]")),
        *[(f"cfg lacks {k}", lambda p, k=k: edit_json(p / SAE_CFG, set_at([k], None, delete=True)))
          for k in ("d_in", "d_sae", "architecture", "k")],
        ("wrong d_in", lambda p: edit_json(p / SAE_CFG, set_at(["d_in"], 33))),
        ("d_sae huge", lambda p: edit_json(p / SAE_CFG, set_at(["d_sae"], 10**12))),
        ("d_in a string", lambda p: edit_json(p / SAE_CFG, set_at(["d_in"], "32"))),
        ("k a string", lambda p: edit_json(p / SAE_CFG, set_at(["k"], "4"))),
        ("k negative", lambda p: edit_json(p / SAE_CFG, set_at(["k"], -1))),
        ("unknown architecture", lambda p: edit_json(p / SAE_CFG, set_at(["architecture"], "mystery"))),
        ("dtype unknown", lambda p: edit_json(p / SAE_CFG, set_at(["dtype"], "float7"))),
        ("weights missing", lambda p: (p / SAE_W).unlink()),
        ("weights truncated", lambda p: truncate(p / SAE_W)),
        ("weights garbage", lambda p: (p / SAE_W).write_bytes(b"\x00" * 64)),
        ("weights float16", lambda p: rewrite_safetensors(p / SAE_W, lambda t: {k: v.half() for k, v in t.items()})),
        ("weights int", lambda p: rewrite_safetensors(p / SAE_W, lambda t: {**t, "b_enc": t["b_enc"].long()})),
        ("W_enc transposed", lambda p: rewrite_safetensors(p / SAE_W, lambda t: {**t, "W_enc": t["W_enc"].T})),
        ("b_dec missing", lambda p: rewrite_safetensors(p / SAE_W, lambda t: {k: v for k, v in t.items() if k != "b_dec"})),
        ("extra tensor", lambda p: rewrite_safetensors(p / SAE_W, lambda t: {**t, "junk": torch.zeros(3)})),
        ("NaN weights", lambda p: rewrite_safetensors(p / SAE_W, lambda t: {**t, "b_enc": t["b_enc"] * float("nan")})),
    ]


MAP_J, MAP_T = "map.json", "map.safetensors"


def _map_cases() -> list:
    def tensors(fn):
        return lambda p: (rewrite_safetensors(p / MAP_T, fn), drop_checksum(p / MAP_J, "tensors_sha256"))

    return [
        ("json malformed", lambda p: truncate(p / MAP_J)),
        ("json missing", lambda p: (p / MAP_J).unlink()),
        ("wrong version", lambda p: edit_json(p / MAP_J, set_at(["format_version"], 9))),
        ("d_a missing", lambda p: edit_json(p / MAP_J, set_at(["d_a"], None, delete=True))),
        ("d_a wrong", lambda p: edit_json(p / MAP_J, set_at(["d_a"], 31))),
        ("d_b a string", lambda p: edit_json(p / MAP_J, set_at(["d_b"], "48"))),
        ("config unknown key", lambda p: edit_json(p / MAP_J, set_at(["config", "bogus"], 1))),
        ("method unknown", lambda p: edit_json(p / MAP_J, set_at(["config", "method"], "magic"))),
        ("scores a list", lambda p: edit_json(p / MAP_J, set_at(["scores"], []))),
        ("tensors truncated", lambda p: truncate(p / MAP_T)),
        ("tensors missing", lambda p: (p / MAP_T).unlink()),
        ("tensor flipped (checksum)", lambda p: (p / MAP_T).write_bytes(
            (p / MAP_T).read_bytes()[:-3] + b"\x00\x01\x02")),
        ("W_ab missing", tensors(lambda t: {k: v for k, v in t.items() if k != "W_ab"})),
        ("W_ab transposed", tensors(lambda t: {**t, "W_ab": t["W_ab"].T})),
        ("float32", tensors(lambda t: {k: v.float() for k, v in t.items()})),
        ("NaN", tensors(lambda t: {**t, "b_ab": t["b_ab"] * float("nan")})),
    ]


def _diff_cases() -> list:
    def table(fn):
        def apply(p):
            import pandas as pd

            fn(pd.read_parquet(p / "features.parquet")).to_parquet(p / "features.parquet")
            drop_checksum(p / "config.json", "sha256")
        return apply

    return [
        ("config malformed", lambda p: truncate(p / "config.json")),
        ("config missing", lambda p: (p / "config.json").unlink()),
        ("config a string", lambda p: (p / "config.json").write_text('"x"')),
        ("wrong kind", lambda p: edit_json(p / "config.json", set_at(["kind"], "diffkit.Other"))),
        ("checksum a list", lambda p: edit_json(p / "config.json", set_at(["sha256"], []))),
        ("table truncated", lambda p: truncate(p / "features.parquet")),
        ("table missing", lambda p: (p / "features.parquet").unlink()),
        ("table garbage", lambda p: (p / "features.parquet").write_bytes(b"PAR1" + b"\x00" * 100 + b"PAR1")),
        ("table byte flipped (checksum)", lambda p: (p / "features.parquet").write_bytes(
            (p / "features.parquet").read_bytes()[:200] + b"\xff" + (p / "features.parquet").read_bytes()[201:])),
        ("column dropped", table(lambda df: df.drop(columns=["kind"]))),
        ("table garbage, no checksum", lambda p: ((p / "features.parquet").write_bytes(b"garbage"),
                                                  drop_checksum(p / "config.json", "sha256"))),
    ]


CC_CFG, CC_W = "cfg.json", "crosscoder.safetensors"


def _cc_cases() -> list:
    def weights(fn):
        return lambda p: (rewrite_safetensors(p / CC_W, fn), drop_checksum(p / CC_CFG, "weights_sha256"))

    return [
        ("cfg malformed", lambda p: truncate(p / CC_CFG)),
        ("cfg missing", lambda p: (p / CC_CFG).unlink()),
        ("cfg a list", lambda p: (p / CC_CFG).write_text("[]")),
        ("wrong version", lambda p: edit_json(p / CC_CFG, set_at(["format_version"], 0))),
        ("unknown key", lambda p: edit_json(p / CC_CFG, set_at(["bogus"], 1))),
        ("missing dict_size", lambda p: edit_json(p / CC_CFG, set_at(["dict_size"], None, delete=True))),
        ("dict_size a string", lambda p: edit_json(p / CC_CFG, set_at(["dict_size"], "64"))),
        ("dict_size huge", lambda p: edit_json(p / CC_CFG, set_at(["dict_size"], 10**12))),
        ("d_in wrong", lambda p: edit_json(p / CC_CFG, set_at(["d_in"], [32, 49]))),
        ("d_in strings", lambda p: edit_json(p / CC_CFG, set_at(["d_in"], ["x", "y"]))),
        ("k a bool", lambda p: edit_json(p / CC_CFG, set_at(["k"], True))),
        ("scale negative", lambda p: edit_json(p / CC_CFG, set_at(["scale"], [-1.0, 1.0]))),
        ("weights truncated", lambda p: truncate(p / CC_W)),
        ("weights missing", lambda p: (p / CC_W).unlink()),
        ("weights flipped (checksum)", lambda p: (p / CC_W).write_bytes((p / CC_W).read_bytes()[:-2] + b"\x7f\x7f")),
        ("W_dec transposed", weights(lambda t: {**t, "W_dec_LD": t["W_dec_LD"].T})),
        ("threshold missing", weights(lambda t: {k: v for k, v in t.items() if k != "threshold"})),
        ("int tensor", weights(lambda t: {**t, "b_enc_L": t["b_enc_L"].long()})),
        ("NaN weights", weights(lambda t: {**t, "b_dec_D": t["b_dec_D"] * float("nan")})),
    ]


def _run_cases() -> list:
    def state(fn):
        def apply(p):
            step = json.loads((p / "checkpoint.json").read_text())["dir"]
            rewrite_safetensors(p / step / "state.safetensors", fn)
        return apply

    def ckpt_dir(p):
        return p / json.loads((p / "checkpoint.json").read_text())["dir"]

    return [
        ("train_config malformed", lambda p: truncate(p / "train_config.json")),
        ("train_config wrong type", lambda p: edit_json(p / "train_config.json", set_at(["lr"], "fast"))),
        ("train_config unknown key", lambda p: edit_json(p / "train_config.json", set_at(["bogus"], 1))),
        ("pointer malformed", lambda p: truncate(p / "checkpoint.json")),
        ("pointer to a missing step", lambda p: edit_json(p / "checkpoint.json", set_at(["step"], 3))),
        ("pointer outside", lambda p: edit_json(p / "checkpoint.json", set_at(["dir"], "../../etc"))),
        ("state.json missing", lambda p: (ckpt_dir(p) / "state.json").unlink()),
        ("state truncated", lambda p: truncate(ckpt_dir(p) / "state.safetensors")),
        ("state missing", lambda p: (ckpt_dir(p) / "state.safetensors").unlink()),
        ("adam moment missing", state(lambda t: {k: v for k, v in t.items() if k != "adam.W_dec_LD.exp_avg"})),
        ("weights wrong shape", state(lambda t: {**t, "model.W_enc_LD": t["model.W_enc_LD"][:10]})),
        ("since_fired missing", state(lambda t: {k: v for k, v in t.items() if k != "since_fired_L"})),
        ("since_fired float", state(lambda t: {**t, "since_fired_L": t["since_fired_L"].float()})),
    ]


MODEL_J, MODEL_W = "model.json", "model.safetensors"


def _model_cases() -> list:
    return [
        ("json malformed", lambda p: truncate(p / MODEL_J)),
        ("json a list", lambda p: (p / MODEL_J).write_text("[]")),
        ("json missing", lambda p: (p / MODEL_J).unlink()),
        ("wrong kind", lambda p: edit_json(p / MODEL_J, set_at(["kind"], "x"))),
        ("config missing", lambda p: edit_json(p / MODEL_J, set_at(["config"], None, delete=True))),
        ("config unknown key", lambda p: edit_json(p / MODEL_J, set_at(["config", "bogus"], 1))),
        ("d_model a string", lambda p: edit_json(p / MODEL_J, set_at(["config", "d_model"], "32"))),
        ("d_model wrong", lambda p: edit_json(p / MODEL_J, set_at(["config", "d_model"], 48))),
        ("n_layers huge", lambda p: edit_json(p / MODEL_J, set_at(["config", "n_layers"], 10**9))),
        ("d_vocab negative", lambda p: edit_json(p / MODEL_J, set_at(["config", "d_vocab"], -3))),
        ("act_fn unknown", lambda p: edit_json(p / MODEL_J, set_at(["config", "act_fn"], "sparkle"))),
        ("tokenizer unknown", lambda p: edit_json(p / MODEL_J, set_at(["tokenizer"], {"kind": "?"}))),
        ("tokenizer missing", lambda p: edit_json(p / MODEL_J, set_at(["tokenizer"], None, delete=True))),
        ("weights missing", lambda p: (p / MODEL_W).unlink()),
        ("weights truncated", lambda p: truncate(p / MODEL_W)),
        ("weights garbage", lambda p: (p / MODEL_W).write_bytes(b"\xff" * 32)),
        ("weights float16", lambda p: rewrite_safetensors(p / MODEL_W, lambda t: {k: v.half() for k, v in t.items()})),
        ("tensor missing", lambda p: rewrite_safetensors(p / MODEL_W, lambda t: {k: v for k, v in t.items()
                                                                                 if k != "embed.W_E"})),
        ("tensor wrong shape", lambda p: rewrite_safetensors(p / MODEL_W, lambda t: {**t, "embed.W_E": t["embed.W_E"].T})),
        ("int tensor", lambda p: rewrite_safetensors(p / MODEL_W, lambda t: {**t, "unembed.b_U": t["unembed.b_U"].long()})),
    ]


CASES = [("store", *c) for c in _store_cases()] + [("sae", *c) for c in _sae_cases()] + \
    [("map", *c) for c in _map_cases()] + [("diff", *c) for c in _diff_cases()] + \
    [("crosscoder", *c) for c in _cc_cases()] + [("run", *c) for c in _run_cases()] + \
    [("model", *c) for c in _model_cases()]


@pytest.mark.parametrize("reader,name,damage", CASES, ids=[f"{r}: {n}" for r, n, _ in CASES])
def test_named_damage_is_a_one_line_error(reader, name, damage, copy_of, references):
    path = copy_of(READERS[reader][0])
    damage(path)
    assert outcome(reader, path, references[reader], f"{reader}: {name}") == "error"


# -- the seeded random pass -----------------------------------------------------------------------
def mutate_bytes(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None) -> bytes:
    """Flip, truncate, insert or delete bytes; flips and inserts land in [lo, hi)."""
    hi = len(data) if hi is None else min(hi, len(data))
    op = rng.choice(["flip", "flip", "truncate", "insert", "delete"])
    buf = bytearray(data)
    if op == "flip":
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        del buf[rng.randrange(len(buf)):]
    elif op == "insert":
        at = rng.randrange(lo, hi)
        buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    else:
        at = rng.randrange(lo, hi)
        del buf[at:at + rng.randint(1, 8)]
    return bytes(buf)


ODD_VALUES = ["x", None, [], {}, True, -1, 10**30, 1.5, "DELETE"]


def mutate_json(text: str, rng: random.Random) -> str:
    """Replace one randomly chosen value (any depth) by one of another type, a negative or huge number,
    or delete it."""
    obj = json.loads(text)
    slots = []

    def walk(node):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            slots.append((node, k))
            walk(v)

    walk(obj)
    if not slots:
        return "{}"
    node, key = rng.choice(slots)
    value = rng.choice([v for v in ODD_VALUES if type(v) is not type(node[key])])
    if value == "DELETE":
        del node[key]
    else:
        node[key] = value
    return json.dumps(obj)


def _safetensors_header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


# (reader, file relative to the artifact, kind): "json" files get value and byte mutations; "bytes"
# files get byte mutations anywhere; "header" files (no checksum) only in their header region.
RANDOM_TARGETS = [
    ("store", "manifest.json", "json"), ("store", SHARD_A, "npy-header"),
    ("store_full", SHARD_A, "bytes"), ("store_full", "tokens/shard_00001.ids.npy", "bytes"),
    ("sae", SAE_CFG, "json"), ("sae", SAE_W, "header"),
    ("map", MAP_J, "json"), ("map", MAP_T, "bytes"),
    ("diff", "config.json", "json"), ("diff", "features.parquet", "bytes"),
    ("crosscoder", CC_CFG, "json"), ("crosscoder", CC_W, "bytes"),
    ("run", "train_config.json", "json"), ("run", "checkpoint.json", "json"),
    ("model", MODEL_J, "json"), ("model", MODEL_W, "header"),
]


@pytest.mark.parametrize("reader,rel,kind", RANDOM_TARGETS, ids=[f"{r}: {f}" for r, f, _ in RANDOM_TARGETS])
def test_random_mutations_load_correctly_or_fail_in_one_line(reader, rel, kind, copy_of, references):
    rng = random.Random(f"{SEED}:{reader}:{rel}")
    tally = {"ok": 0, "error": 0}
    for i in range(N_RANDOM):
        path = copy_of(READERS[reader][0])
        target = path / rel
        data = target.read_bytes()
        if kind == "json" and rng.random() < 0.7:
            target.write_text(mutate_json(data.decode(), rng))
        elif kind == "header":
            target.write_bytes(mutate_bytes(data, rng, 0, _safetensors_header_end(data)))
        elif kind == "npy-header":
            target.write_bytes(mutate_bytes(data, rng, 0, 128))
        else:
            target.write_bytes(mutate_bytes(data, rng))
        if target.read_bytes() == data:
            continue
        tally[outcome(reader, path, references[reader], f"{reader}: {rel} mutation {i}")] += 1
    assert tally["error"] > 0  # the pass damaged something that mattered


# -- through the CLI ------------------------------------------------------------------------------
def test_cli_turns_damage_into_one_line_and_exit_2(copy_of, pristine):
    """The real entry point: a damaged manifest and a damaged SAE give exit 2, one line, no traceback."""
    store = copy_of("store")
    edit_json(store / M, lambda m: m["shards"][0].update(n_train=-1))
    sae = copy_of("sae")
    truncate(sae / SAE_W)
    for args in (["store", "verify", str(store)],
                 ["align", "--sae-a", str(sae), "--sae-b", str(pristine["sae"].parent / "sae_b"),
                  "--acts", str(pristine["store"]), "--out", str(store.parent / "al"), "--quiet"]):
        res = subprocess.run([sys.executable, "-m", "diffkit.cli", *args], capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 2, res.stderr
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.stderr, res.stderr
