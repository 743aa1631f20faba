"""Fuzz pass over every file reader: each damaged input is rejected with a one-line DiffkitError, or loads
to exactly the data of the undamaged artifact -- never a traceback, never a silent wrong result.

Artifacts are real: a store collected from two TransformerLens checkpoints, sae-lens TopK SAEs saved
with ``save_model``, a fitted LinearMap, a FeatureDiff from ``align``, a crosscoder trained with
checkpoints, its LatentTable from ``analyze``, a comparison from ``compare``, and a diffkit model
checkpoint. Two passes per reader:

- named cases (parametrized): malformed JSON, missing fields, wrong types and versions, counts that
  do not add up, truncated / missing / wrong-dtype / wrong-shape tensors, garbage headers. A named
  edit of a sealed JSON is resealed (and a replaced payload file's checksum updated), so the field
  check *behind* the seal is what fires; separate cases show the unsealed edit, a deleted seal and a
  file of the format before seals are refused by the seal itself;
- a seeded random mutation pass whose mutations are chosen by the artifact's *structure*, not by its
  text (the fitted digits move with numpy/scipy/torch versions, and a mutation picked by byte offset
  once hit a different value on another install): a JSON value replaced by one of another type or
  deleted, a number nudged to a nearby valid value, or a byte flipped / deleted / inserted / cut at
  one of the file's structural characters (``{}[]:,"``); binary payloads get bytes mutated anywhere.
  Each mutation has its own generator, so one draw never shifts the next.

The property checked is the issue's "no byte changes silently": for a sealed JSON (and every file a
checksum covers) any change that alters what the file parses to must be a one-line error; other
damage must be an error or load to exactly the undamaged data. Payload bytes of sae-lens's
``sae_weights.safetensors`` carry no checksum (sae-lens's format, which diffkit does not extend)
and are excluded from byte flips: a flipped float there is a valid file no reader can tell from the
original. Store shards are checked with ``verify="full"`` (``diffkit store verify``) for payload flips
and with the default size check for everything else.
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
from diffkit.io import SEAL_KEY, reseal_json, sha256_file

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
        return save_diff(diff, self.root / "diff", {"acts": str(self.store.root), "sae_a": str(self["sae"]),
                                                    "sae_b": str(self.root / "sae_b")})

    def _build_analysis(self) -> Path:
        from baselines.crosscoder.analysis import AnalyzeConfig, analyze

        analyze(AnalyzeConfig(crosscoder=str(self["cc"]), acts=str(self.store.root), out=str(self.root / "analysis"),
                              split="all", n_contexts=1, top_n=2), progress=False)
        return self.root / "analysis"

    def _build_compare(self) -> Path:
        from diffkit.compare import CompareConfig, compare

        compare(CompareConfig(align=str(self["diff"]), crosscoder=str(self["cc"]), acts=str(self.store.root),
                              out=str(self.root / "compare"), top=2, n_contexts=1))
        return self.root / "compare"

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


def read_diff(path: Path) -> dict:
    from diffkit.diff import load_diff_json, load_table

    return {"table": load_table(path), "summary": load_diff_json(path, "summary.json"),
            "contexts": load_diff_json(path, "contexts.json")}


def read_compare(path: Path) -> dict:
    from diffkit.compare import load_comparison

    c = load_comparison(path)
    return {"summary": c.summary, "bridge": c.bridge, "curves": c.curves}


def read_analysis(path: Path) -> dict:
    from baselines.crosscoder.analysis import load_analysis_summary, load_latents

    return {"table": load_latents(path), "summary": load_analysis_summary(path)}


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
    "analysis": ("analysis", read_analysis), "compare": ("compare", read_compare),
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


def outcome(reader: str, path: Path, reference: Any, what: str, must_fail: bool = False) -> str:
    """'error' (a one-line DiffkitError) or 'ok' (equal to the reference); anything else fails the test.
    ``must_fail``: the damage changed what a checksummed file holds, so loading it at all is silent damage."""
    try:
        got = READERS[reader][1](path)
    except DiffkitError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and len(msg) < 600, f"{what}: error is not one short line: {msg!r}"
        return "error"
    assert same(reference, got), f"{what}: loaded without error but the data differ (a silent wrong result)"
    assert not must_fail, f"{what}: the file's contents changed and it loaded without error (damage accepted silently)"
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
def edit_json(path: Path, fn: Callable[[Any], Any], reseal: bool = True) -> None:
    """Apply ``fn`` to the parsed file; a sealed file is resealed (unless ``reseal`` is False), so the
    check that fires is the field check behind the seal, not the seal."""
    obj = json.loads(path.read_text())
    sealed = isinstance(obj, dict) and SEAL_KEY in obj
    new = fn(obj)
    path.write_text(json.dumps(obj if new is None else new))
    if reseal and sealed and isinstance(json.loads(path.read_text()), dict):
        reseal_json(path)


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


def flip_bit(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 1
    path.write_bytes(bytes(data))


def update_checksum(json_path: Path, keys: list, payload: Path) -> None:
    """Record ``payload``'s new sha256 at ``keys`` and reseal, so the check behind the checksum (shape,
    dtype, columns) is what fires."""
    edit_json(json_path, set_at(keys, sha256_file(payload)))


def seal_cases(rel: str, versioned: bool = True) -> list:
    """The seal itself: an unsealed edit, a deleted or garbled seal, a file of the format before seals."""
    def older(obj):
        obj.pop(SEAL_KEY)
        obj["format_version"] -= 1
    return [
        (f"{rel} edited, seal stale", lambda p: edit_json(p / rel, lambda o: o.update(zz_note="x"), reseal=False)),
        (f"{rel} seal deleted", lambda p: edit_json(p / rel, lambda o: o.pop(SEAL_KEY) and None, reseal=False)),
        (f"{rel} seal a list", lambda p: edit_json(p / rel, set_at([SEAL_KEY], []), reseal=False)),
        (f"{rel} seal of another file", lambda p: edit_json(p / rel, set_at([SEAL_KEY], "0" * 64), reseal=False)),
    ] + ([(f"{rel} older format without seal", lambda p: edit_json(p / rel, older, reseal=False))] if versioned else [])


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
        *seal_cases(M),
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
        return lambda p: (rewrite_safetensors(p / MAP_T, fn), update_checksum(p / MAP_J, ["tensors_sha256"], p / MAP_T))

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
        ("tensor bit flipped (checksum)", lambda p: flip_bit(p / MAP_T, -3)),
        ("W_ab missing", tensors(lambda t: {k: v for k, v in t.items() if k != "W_ab"})),
        ("W_ab transposed", tensors(lambda t: {**t, "W_ab": t["W_ab"].T})),
        ("float32", tensors(lambda t: {k: v.float() for k, v in t.items()})),
        ("NaN", tensors(lambda t: {**t, "b_ab": t["b_ab"] * float("nan")})),
        ("score nudged (only the seal sees it)", lambda p: edit_json(
            p / MAP_J, lambda m: m["scores"]["b_to_a"]["heldout_fve_per_dim"].__setitem__(30, 0.25), reseal=False)),
        ("checksum deleted, resealed", lambda p: edit_json(p / MAP_J, set_at(["tensors_sha256"], None, delete=True))),
        *seal_cases(MAP_J),
    ]


def _diff_cases() -> list:
    def table(fn):
        def apply(p):
            import pandas as pd

            fn(pd.read_parquet(p / "features.parquet")).to_parquet(p / "features.parquet")
            update_checksum(p / "config.json", ["sha256", "features.parquet"], p / "features.parquet")
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
        ("table bit flipped (checksum)", lambda p: flip_bit(p / "features.parquet", 200)),
        ("column dropped", table(lambda df: df.drop(columns=["kind"]))),
        ("table garbage, checksum updated", lambda p: ((p / "features.parquet").write_bytes(b"garbage"),
                                                       update_checksum(p / "config.json", ["sha256", "features.parquet"],
                                                                       p / "features.parquet"))),
        ("summary edited", lambda p: edit_json(p / "summary.json", set_at(["threshold"], 0.25))),
        ("summary missing", lambda p: (p / "summary.json").unlink()),
        ("contexts truncated", lambda p: truncate(p / "contexts.json")),
        ("summary checksum deleted, resealed", lambda p: edit_json(
            p / "config.json", lambda c: c["sha256"].pop("summary.json") and None)),
        *seal_cases("config.json"),
    ]


CC_CFG, CC_W = "cfg.json", "crosscoder.safetensors"


def _cc_cases() -> list:
    def weights(fn):
        return lambda p: (rewrite_safetensors(p / CC_W, fn), update_checksum(p / CC_CFG, ["weights_sha256"], p / CC_W))

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
        ("weights bit flipped (checksum)", lambda p: flip_bit(p / CC_W, -2)),
        ("W_dec transposed", weights(lambda t: {**t, "W_dec_LD": t["W_dec_LD"].T})),
        ("threshold missing", weights(lambda t: {k: v for k, v in t.items() if k != "threshold"})),
        ("int tensor", weights(lambda t: {**t, "b_enc_L": t["b_enc_L"].long()})),
        ("NaN weights", weights(lambda t: {**t, "b_dec_D": t["b_dec_D"] * float("nan")})),
        ("weights checksum deleted, resealed", lambda p: edit_json(p / CC_CFG, set_at(["weights_sha256"], None,
                                                                                     delete=True))),
        *seal_cases(CC_CFG),
    ]


LAST_CKPT = "checkpoints/step_0000005"  # RUN_OPTIONS: 5 steps of 256 tokens, the last one checkpointed


def _run_cases() -> list:
    def state(fn):
        def apply(p):
            step = json.loads((p / "checkpoint.json").read_text())["dir"]
            rewrite_safetensors(p / step / "state.safetensors", fn)
            update_checksum(p / step / "state.json", ["state_sha256"], p / step / "state.safetensors")
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
        ("state bit flipped (checksum)", lambda p: flip_bit(ckpt_dir(p) / "state.safetensors", -4)),
        ("state checksum deleted, resealed", lambda p: edit_json(ckpt_dir(p) / "state.json",
                                                                 set_at(["state_sha256"], None, delete=True))),
        *seal_cases("checkpoint.json", versioned=False),
        *seal_cases(f"{LAST_CKPT}/state.json", versioned=False),
    ]


MODEL_J, MODEL_W = "model.json", "model.safetensors"


def _model_cases() -> list:
    def weights(fn):
        return lambda p: (rewrite_safetensors(p / MODEL_W, fn), update_checksum(p / MODEL_J, ["weights_sha256"],
                                                                              p / MODEL_W))

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
        ("weights float16", weights(lambda t: {k: v.half() for k, v in t.items()})),
        ("tensor missing", weights(lambda t: {k: v for k, v in t.items() if k != "embed.W_E"})),
        ("tensor wrong shape", weights(lambda t: {**t, "embed.W_E": t["embed.W_E"].T})),
        ("int tensor", weights(lambda t: {**t, "unembed.b_U": t["unembed.b_U"].long()})),
        ("weight bit flipped (checksum)", lambda p: flip_bit(p / MODEL_W, -2)),
        ("weights checksum deleted, resealed", lambda p: edit_json(p / MODEL_J, set_at(["weights_sha256"], None,
                                                                                      delete=True))),
        *seal_cases(MODEL_J),
    ]


CMP_J = "comparison.json"


def _compare_cases() -> list:
    return [
        ("summary missing", lambda p: (p / CMP_J).unlink()),
        ("summary malformed", lambda p: truncate(p / CMP_J)),
        ("wrong version", lambda p: edit_json(p / CMP_J, set_at(["format_version"], 7))),
        ("bridge bit flipped (checksum)", lambda p: flip_bit(p / "bridge.parquet", -20)),
        ("curves edited", lambda p: (p / "precision_at_k.csv").write_text("k,precision\n1,1.0\n")),
        ("bridge checksum deleted, resealed", lambda p: edit_json(p / CMP_J, lambda s: s["sha256"].pop("bridge.parquet")
                                                                  and None)),
        *seal_cases(CMP_J),
    ]


LAT_J, LAT_T = "latents.json", "latents.parquet"


def _analysis_cases() -> list:
    def table(fn):
        def apply(p):
            import pandas as pd

            fn(pd.read_parquet(p / LAT_T)).to_parquet(p / LAT_T)
            update_checksum(p / LAT_J, ["sha256", LAT_T], p / LAT_T)
        return apply

    return [
        ("descriptor missing", lambda p: (p / LAT_J).unlink()),
        ("descriptor malformed", lambda p: truncate(p / LAT_J)),
        ("wrong kind", lambda p: edit_json(p / LAT_J, set_at(["kind"], "diffkit.FeatureDiff"))),
        ("sha256 a list", lambda p: edit_json(p / LAT_J, set_at(["sha256"], []))),
        ("table missing", lambda p: (p / LAT_T).unlink()),
        ("table bit flipped (checksum)", lambda p: flip_bit(p / LAT_T, 100)),
        ("table garbage, checksum updated", lambda p: ((p / LAT_T).write_bytes(b"PAR1 garbage"),
                                                       update_checksum(p / LAT_J, ["sha256", LAT_T], p / LAT_T))),
        ("column dropped", table(lambda df: df.drop(columns=["rel_norm_r_b"]))),
        ("summary edited", lambda p: edit_json(p / "summary.json", lambda s: s.update(extra=1))),
        ("summary a list, checksum updated", lambda p: ((p / "summary.json").write_text("[]"),
                                                        update_checksum(p / LAT_J, ["sha256", "summary.json"],
                                                                        p / "summary.json"))),
        *seal_cases(LAT_J),
    ]


CASES = [("store", *c) for c in _store_cases()] + [("sae", *c) for c in _sae_cases()] + \
    [("map", *c) for c in _map_cases()] + [("diff", *c) for c in _diff_cases()] + \
    [("crosscoder", *c) for c in _cc_cases()] + [("run", *c) for c in _run_cases()] + \
    [("model", *c) for c in _model_cases()] + [("analysis", *c) for c in _analysis_cases()] + \
    [("compare", *c) for c in _compare_cases()]


@pytest.mark.parametrize("reader,name,damage", CASES, ids=[f"{r}: {n}" for r, n, _ in CASES])
def test_named_damage_is_a_one_line_error(reader, name, damage, copy_of, references):
    path = copy_of(READERS[reader][0])
    damage(path)
    assert outcome(reader, path, references[reader], f"{reader}: {name}") == "error"


# -- the seeded random pass -----------------------------------------------------------------------
# Every mutation draws from its own generator (seeded by reader, file and index) and chooses *where* by
# the artifact's structure: a JSON slot by its index in document order, a JSON byte among the file's
# structural characters, a binary byte by offset in a file whose length fixed shapes determine (or, for
# the parquet tables, a file every byte of which a checksum covers). The fitted digits never decide
# which mutation is made or whether a correct reader must refuse it.
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
PUNCT = frozenset(b'{}[]:,"')


def _slots(obj: Any) -> list:
    """(container, key) of every value at any depth, in document order."""
    slots = []

    def walk(node):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            slots.append((node, k))
            walk(v)

    walk(obj)
    return slots


def mutate_json(text: str, rng: random.Random) -> str:
    """Replace one value (any depth, chosen by position) by one of another type, a negative or huge number,
    or delete it."""
    obj = json.loads(text)
    slots = _slots(obj)
    if not slots:
        return "{}"
    node, key = rng.choice(slots)
    value = rng.choice([v for v in ODD_VALUES if type(v) is not type(node[key])])
    if value == "DELETE":
        del node[key]
    else:
        node[key] = value
    return json.dumps(obj)


def nudge_json(text: str, rng: random.Random) -> str:
    """Move one number (chosen by position) to a nearby valid value of its type: damage that no field
    check can see (a score 1e-3 lower is still a score), only a checksum."""
    obj = json.loads(text)
    numbers = [(n, k) for n, k in _slots(obj) if type(n[k]) in (int, float)]
    if not numbers:
        return mutate_json(text, rng)
    node, key = rng.choice(numbers)
    x = node[key]
    node[key] = x + 1 if isinstance(x, int) else x - (abs(x) + 1e-3) * 1e-3
    return json.dumps(obj)


def mutate_structure(data: bytes, rng: random.Random) -> bytes:
    """Flip a bit of, delete, insert random bytes before, or cut the file at one structural character."""
    at = rng.choice([i for i, c in enumerate(data) if c in PUNCT])
    op = rng.choice(["flip", "delete", "insert", "truncate"])
    buf = bytearray(data)
    if op == "flip":
        buf[at] ^= 1 << rng.randrange(8)
    elif op == "delete":
        del buf[at]
    elif op == "insert":
        buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    else:
        del buf[at:]
    return bytes(buf)


def _safetensors_header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def parses_to_the_same(a: bytes, b: bytes) -> bool:
    try:
        return json.dumps(json.loads(a), sort_keys=True) == json.dumps(json.loads(b), sort_keys=True)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False


# (reader, file relative to the artifact, kind, guarded). "json" files get value, structural byte and (when
# guarded) number mutations; "bytes" files byte mutations anywhere; "header" / "npy-header" files (no checksum over
# the payload) only in their header region. ``guarded``: a checksum covers the file, so any change to
# what it holds must be refused (the issue's "no byte changes silently").
RANDOM_TARGETS = [
    ("store", M, "json", True), ("store", SHARD_A, "npy-header", False),
    ("store_full", SHARD_A, "bytes", True), ("store_full", "tokens/shard_00001.ids.npy", "bytes", True),
    ("sae", SAE_CFG, "json", False), ("sae", SAE_W, "header", False),
    ("map", MAP_J, "json", True), ("map", MAP_T, "bytes", True),
    ("diff", "config.json", "json", True), ("diff", "features.parquet", "bytes", True),
    ("diff", "summary.json", "json", True), ("diff", "contexts.json", "json", True),
    ("crosscoder", CC_CFG, "json", True), ("crosscoder", CC_W, "bytes", True),
    ("run", "train_config.json", "json", False), ("run", "checkpoint.json", "json", True),
    ("run", f"{LAST_CKPT}/state.json", "json", True), ("run", f"{LAST_CKPT}/state.safetensors", "bytes", True),
    ("model", MODEL_J, "json", True), ("model", MODEL_W, "bytes", True),
    ("analysis", LAT_J, "json", True), ("analysis", LAT_T, "bytes", True), ("analysis", "summary.json", "json", True),
    ("compare", CMP_J, "json", True), ("compare", "bridge.parquet", "bytes", True),
]


def random_pass(reader: str, rel: str, kind: str, guarded: bool, copy_of, references) -> dict:
    tally = {"ok": 0, "error": 0}
    for i in range(N_RANDOM):
        rng = random.Random(f"{SEED}:{reader}:{rel}:{i}")
        path = copy_of(READERS[reader][0])
        target = path / rel
        data = target.read_bytes()
        if kind == "json":
            # A nudged number is a valid edit (k = 5 instead of 4 is another TopK SAE): only a checksum can
            # refuse it, so unguarded files (sae-lens's cfg.json, the run's train_config.json) do not get it.
            ops = ["value", "number", "structure"] if guarded else ["value", "structure"]
            op = rng.choice(ops)
            new = (mutate_json(data.decode(), rng).encode() if op == "value" else
                   nudge_json(data.decode(), rng).encode() if op == "number" else mutate_structure(data, rng))
        elif kind == "header":
            new = mutate_bytes(data, rng, 0, _safetensors_header_end(data))
        elif kind == "npy-header":
            new = mutate_bytes(data, rng, 0, 128)
        else:
            new = mutate_bytes(data, rng)
        if new == data:
            continue
        target.write_bytes(new)
        must_fail = guarded and not (kind == "json" and parses_to_the_same(new, data))
        tally[outcome(reader, path, references[reader], f"{reader}: {rel} mutation {i}", must_fail)] += 1
    return tally


@pytest.mark.parametrize("reader,rel,kind,guarded", RANDOM_TARGETS, ids=[f"{r}: {f}" for r, f, _, _ in RANDOM_TARGETS])
def test_random_mutations_load_correctly_or_fail_in_one_line(reader, rel, kind, guarded, copy_of, references):
    tally = random_pass(reader, rel, kind, guarded, copy_of, references)
    assert tally["error"] > 0  # the pass damaged something that mattered


def test_the_pass_catches_a_map_reader_without_a_checksum_over_its_scores(monkeypatch, copy_of, references):
    """``LinearMap.load`` as it was before seals (every field validated, the tensors checksummed, nothing
    over the scores): the same pass finds damage it accepts. The seal check is switched off to get it."""
    import diffkit.io

    references["map"]  # the reference is read by the sealed reader, before the switch
    monkeypatch.setattr(diffkit.io, "verify_seal", lambda path, obj, fix: {k: v for k, v in obj.items()
                                                                            if k != SEAL_KEY})
    with pytest.raises(AssertionError, match="silent"):  # here: mutation 6 of 14, the same on every install
        random_pass("map", MAP_J, "json", True, copy_of, references)


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
