"""The pipeline's config: one TOML file -> frozen dataclasses, checked strictly.

Every section is a frozen dataclass below; its fields are the keys the file may hold, with their
types and defaults. An unknown key, a wrong type or a bad value is a one-line
:class:`~diffkit.errors.DiffkitError` naming the key (``diffkit run`` exits 2). The resolved config (every
default filled in) is saved as ``config.json`` in the work folder; a resume compares it with the
new one to find the stages a change reaches (:mod:`diffkit.pipeline.runner`).
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DiffkitError

METHODS = ("align", "crosscoder")


@dataclass(frozen=True)
class Models:
    """The two models: ``zoo:NAME``, a model directory (diffkit checkpoint or HF), or a TransformerLens name.

    ``b = "finetune"``: model A fine-tuned here as ``[finetune]`` says (A must be an HF directory or zoo:smollm2).
    """

    a: str = ""
    b: str = ""


@dataclass(frozen=True)
class Finetune:
    """The fine-tune of model A when ``models.b = "finetune"`` (AdamW, warm-up then cosine, on HF weights)."""

    corpus: str = "code"
    steps: int = 60
    batch: int = 8
    ctx: int = 64
    lr: float = 2e-4
    warmup: int = 5


@dataclass(frozen=True)
class Data:
    """The paired activations: where, on what text, how many tokens (``diffkit collect``'s options).

    ``store``: an ActivationStore you already have (``diffkit store import``, ``diffkit collect``, a planted
    pair) is diffed as it is: nothing is collected, the other options here must stay unset, and the
    models are only names (the store's own by default)."""

    store: str = ""
    hook: str = ""
    hook_b: str = ""                # B's hook when it differs from A's
    corpus: str = "mixed"
    tokens: int = 100_000           # per store (BOS and padding excluded)
    ctx: int = 128
    batch_size: int = 32
    dtype: str = "float32"
    max_norm_ratio: float = 0.0


@dataclass(frozen=True)
class SAETrain:
    """Options of every SAE the config asks to ``train``: :class:`diffkit.sae_train.SAETrainConfig`'s
    (``diffkit sae train``'s options: sae-lens's own trainer fed from the store), plus the null's seed."""

    arch: str = "topk"              # topk | batchtopk | jumprelu | standard
    d_sae: int = 1024
    k: int = 24
    tokens: int = 819_200           # training samples (steps x batch_size)
    batch_size: int = 1024
    lr: float = 3e-3
    warmup_steps: int = 50
    normalize: bool = True          # train on x * sqrt(d) / mean ||x||, folded into the saved weights
    dead_feature_window: int = 400  # steps without firing before a latent counts as dead (TopK's auxiliary loss)
    seed: int = 0
    seed_b: int = -1                # B's SAE seed; -1: seed (a seed pair of SAEs on two rotated copies needs two)
    null_seed: int = 1              # the seed of the null SAE (a second SAE of model A)

    def seed_of(self, role: str) -> int:
        """The seed of the SAE of ``role`` (a, b, null, seed_pair)."""
        return self.null_seed if role == "null" else self.seed_b if role == "b" and self.seed_b >= 0 else self.seed

    def trainer_config(self, seed: int | None = None):
        """The :class:`~diffkit.sae_train.SAETrainConfig` of these options (``seed`` for the null)."""
        from ..sae_train import SAETrainConfig

        return SAETrainConfig(arch=self.arch, d_sae=self.d_sae, k=self.k, tokens=self.tokens,
                              batch_size=self.batch_size, lr=self.lr, warmup_steps=self.warmup_steps,
                              dead_feature_window=self.dead_feature_window, normalize=self.normalize,
                              seed=self.seed if seed is None else seed)


@dataclass(frozen=True)
class SAEs:
    """Each SAE: ``train``, ``zoo:NAME[@seedN]``, a directory in sae-lens's format, or ``RELEASE/ID`` (sae-lens registry).

    ``null`` is a second SAE of model A (another seed): the SAE-seed control, run when ``controls.sae_seed``.
    ``seed_pair`` is the SAE of ``controls.model_seed``'s model.
    """

    a: str = "train"
    b: str = "train"
    null: str = "train"
    seed_pair: str = "train"
    train: SAETrain = field(default_factory=SAETrain)


@dataclass(frozen=True)
class Crosscoder:
    """The BatchTopK crosscoder baseline, one per store (``diffkit crosscoder train``'s options)."""

    dict_size: int = 4096
    k: int = 32
    tokens: int = 600_000
    batch_size: int = 2048
    lr: float = 1e-3


@dataclass(frozen=True)
class Controls:
    """``sae_seed``: A vs A with A's SAE and the null SAE, the noise floor of both methods.
    ``model_seed``: a model trained like A with another seed (a spec; empty for none), diffed against A."""

    sae_seed: bool = True
    model_seed: str = ""


@dataclass(frozen=True)
class Compare:
    tokens: int = 200_000           # tokens of the split for the head-to-head analysis
    split: str = "heldout"          # heldout | train | all


@dataclass(frozen=True)
class Report:
    """``losses``: a table of both models' held-out next-token loss on prose and code first."""

    title: str = "diffkit: head to head"
    intro: str = ""                 # a markdown paragraph about the models, first in the report
    losses: bool = False
    loss_sequences: int = 64        # held-out sequences (ctx 128) per domain for the losses table
    style: str = "generic"          # "generic" or "smollm2" (that recipe's preamble: top changed features)


@dataclass(frozen=True)
class PipelineConfig:
    """One ``diffkit run`` config (see ``diffkit/pipeline/configs/example.toml``)."""

    work: str = ""                  # where the (large) artifacts go; default runs/NAME-OF-THE-CONFIG
    out: str = ""                   # where report.md goes; default WORK/report
    threads: int = 2
    device: str = "cpu"
    seed: int = 0
    methods: tuple[str, ...] = METHODS
    models: Models = field(default_factory=Models)
    finetune: Finetune = field(default_factory=Finetune)
    data: Data = field(default_factory=Data)
    saes: SAEs = field(default_factory=SAEs)
    crosscoder: Crosscoder = field(default_factory=Crosscoder)
    controls: Controls = field(default_factory=Controls)
    compare: Compare = field(default_factory=Compare)
    report: Report = field(default_factory=Report)

    def to_json(self) -> dict:
        """The config as the JSON object saved beside the run (tuples become lists, as JSON has no tuple)."""
        import json

        return json.loads(json.dumps(asdict(self)))


def _fail(key: str, problem: str) -> DiffkitError:
    return DiffkitError(f"config key {key!r}: {problem}")


def _value(key: str, tp: Any, value: Any) -> Any:
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(key, f"must be a table ([{key}]), got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if typing.get_origin(tp) is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise _fail(key, "must be a list of strings")
        return tuple(value)
    ok = isinstance(value, tp) and not (tp is int and isinstance(value, bool)) or \
        (tp is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise _fail(key, f"must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return float(value) if tp is float else value


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise _fail(prefix + unknown[0], f"unknown (allowed here: {', '.join(sorted(names))})")
    return cls(**{k: _value(prefix + k, hints[k], v) for k, v in data.items()})


def _check_given_store(cfg: PipelineConfig) -> None:
    """``data.store``: what only collecting makes (a fine-tune, losses, the A vs A and seed-model stores) is an error."""
    for key in (f.name for f in dataclasses.fields(Data)):
        if key not in ("store", "hook", "hook_b") and getattr(cfg.data, key) != getattr(Data(), key):
            raise _fail(f"data.{key}", "does nothing with data.store (the store is diffed as it is): remove it")
    for key, bad, why in (("models.b", cfg.models.b == "finetune", "'finetune' makes a model to collect from"),
                          ("report.losses", cfg.report.losses, "the losses table runs the models"),
                          ("controls.model_seed", bool(cfg.controls.model_seed), "the seed-model pair is collected")):
        if bad:
            raise _fail(key, f"{why}, which data.store skips: remove it, or collect (drop data.store)")


def _check(cfg: PipelineConfig) -> None:
    if cfg.models.a == "finetune":
        raise _fail("models.a", "'finetune' names model B only (A fine-tuned); A is the model it starts from")
    if cfg.data.store:
        _check_given_store(cfg)
    elif not cfg.models.a or not cfg.models.b:
        raise _fail("models.a" if not cfg.models.a else "models.b", "is required (zoo:NAME, a directory or a hub name)")
    elif not cfg.data.hook:
        raise _fail("data.hook", "is required, e.g. blocks.0.hook_resid_post")
    if cfg.compare.split not in ("heldout", "train", "all"):
        raise _fail("compare.split", f"{cfg.compare.split!r} must be heldout, train or all")
    for key, value in (("threads", cfg.threads), ("data.tokens", cfg.data.tokens), ("data.ctx", cfg.data.ctx - 1),
                       ("data.batch_size", cfg.data.batch_size), ("crosscoder.dict_size", cfg.crosscoder.dict_size),
                       ("crosscoder.k", cfg.crosscoder.k), ("crosscoder.tokens", cfg.crosscoder.tokens),
                       ("crosscoder.batch_size", cfg.crosscoder.batch_size), ("compare.tokens", cfg.compare.tokens),
                       ("finetune.batch", cfg.finetune.batch), ("finetune.ctx", cfg.finetune.ctx - 1),
                       ("finetune.steps", cfg.finetune.steps + 1), ("report.loss_sequences", cfg.report.loss_sequences)):
        if value <= 0:
            shown = value + 1 if key.endswith(".ctx") else value - 1 if key == "finetune.steps" else value
            raise _fail(key, f"must be {'>= 0' if key == 'finetune.steps' else 'positive'}, got {shown}")
    try:
        cfg.saes.train.trainer_config()
    except DiffkitError as exc:  # the trainer's own checks, named by the config's key
        flag = str(exc).split()[0]
        raise _fail("saes.train." + flag.removeprefix("--").replace("-", "_"), str(exc)) from None
    if cfg.crosscoder.k > cfg.crosscoder.dict_size:
        raise _fail("crosscoder.k", f"{cfg.crosscoder.k} exceeds dict_size {cfg.crosscoder.dict_size}")
    if cfg.methods != METHODS:
        raise _fail("methods", f"must be {list(METHODS)} (the head to head needs both; one-method runs are not "
                               "supported yet)")
    if cfg.controls.sae_seed and not cfg.saes.null:
        raise _fail("saes.null", "is empty but controls.sae_seed is on: give a second SAE of A, or 'train'")
    if cfg.report.style not in ("generic", "smollm2"):
        raise _fail("report.style", f"{cfg.report.style!r} must be 'generic' or 'smollm2'")
    for key in ("a", "b", "null", "seed_pair"):
        spec = getattr(cfg.saes, key)
        if spec.startswith("train") and spec != "train":
            raise _fail(f"saes.{key}", f"{spec!r}: write 'train' and put its options under [saes.train]")


def from_dict(data: dict) -> PipelineConfig:
    """A checked :class:`PipelineConfig` from a parsed TOML (or the saved JSON) dict."""
    cfg = _build(PipelineConfig, data)
    _check(cfg)
    return cfg


def _toml():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib


def load_config(path: str | Path, overrides: dict | None = None) -> PipelineConfig:
    """Read, check and resolve the TOML file at ``path`` (or a packaged config's name: ``demo``, ``smollm2-cpu``...);
    ``overrides`` ({dotted key: value}) win over it.

    A relative ``work`` / ``out`` stays relative to the current directory (as every CLI path does).
    """
    path = Path(path)
    shipped = Path(__file__).resolve().parent / "configs" / f"{path}.toml"
    if not path.is_file() and path.name == str(path) and shipped.is_file():  # a packaged config by name
        path = shipped
    if not path.is_file():
        raise DiffkitError(f"config file {path} not found: pass a TOML file (see diffkit/pipeline/configs/example.toml)")
    try:
        data = _toml().loads(path.read_text())
    except (_toml().TOMLDecodeError, UnicodeDecodeError) as exc:
        raise DiffkitError(f"{path} is not valid TOML: {str(exc).splitlines()[0]}") from None
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    cfg = from_dict(data)
    work = cfg.work or f"runs/{path.stem}"
    return dataclasses.replace(cfg, work=work, out=cfg.out or str(Path(work) / "report"))


def packaged(name: str) -> Path:
    """The config shipped in the package as ``configs/NAME.toml`` (``demo``, ``example``...)."""
    path = Path(__file__).resolve().parent / "configs" / f"{name}.toml"
    if not path.exists():
        raise DiffkitError(f"no packaged config {name!r}")
    return path


def flat(cfg: PipelineConfig) -> dict[str, Any]:
    """``{"data.tokens": 100000, ...}``: every leaf option by its dotted key."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, prefix + k + ".")
            else:
                out[prefix + k] = tuple(v) if isinstance(v, list) else v

    walk(cfg.to_json(), "")
    return out
