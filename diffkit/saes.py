"""SAE specs -> loaded sae-lens SAEs, checked against an activation store.

A SPEC is one of:

1. a local **sae-lens directory** (``cfg.json`` + ``sae_weights.safetensors``), loaded with
   ``SAE.load_from_disk``;
2. a plain **safetensors file** with ``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_in), ``b_enc``,
   ``b_dec`` (and ``threshold`` for JumpReLU) plus a JSON config beside it (``NAME.json`` or
   ``cfg.json``) holding at least ``d_in`` and ``d_sae``; ``architecture`` defaults to ``jumprelu``
   when a threshold is present, ``topk`` when the config has ``k``, else ``standard``; built with
   ``SAE.from_dict`` so the encoding is sae-lens's own;
3. ``zoo:NAME`` (or ``zoo:NAME@seedN``): an SAE of the embedded zoo at blocks.0, an sae-lens directory;
   ``zoo:NAME/blocks.1`` (``zoo:NAME@seedN/blocks.1``): the one at ``blocks.1.hook_resid_post``;
4. ``RELEASE/SAE_ID`` from sae-lens's pretrained registry (``pretrained_saes.yaml``), loaded with
   ``SAE.from_pretrained`` (needs the hub; the SAE id may itself contain slashes).

Encoding always goes through the SAE's own ``encode``, so JumpReLU thresholds, TopK's k, and the
``layer_norm`` / ``constant_norm_rescale`` normalizations are sae-lens's. The one normalization
sae-lens leaves to the caller, ``expected_average_only_in`` (inputs scaled to mean norm sqrt(d_in)),
is applied here with the store's scale for that model, which is exactly sqrt(d)/mean norm.
Otherwise raw activations are encoded: that is what SAEs are trained on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DiffkitError
from .store_format import first_line

SAE_LENS_CFG = "cfg.json"
SAE_LENS_WEIGHTS = "sae_weights.safetensors"
SCALED_INPUT = "expected_average_only_in"


@dataclass
class LoadedSAE:
    """An sae-lens SAE with where it came from; decoder rows are the feature directions."""

    spec: str
    source: str  # "sae-lens dir" | "safetensors" | "registry"
    sae: Any

    @property
    def d_in(self) -> int:
        return int(self.sae.cfg.d_in)

    @property
    def d_sae(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def hook_name(self) -> str | None:
        return getattr(self.sae.cfg.metadata, "hook_name", None)

    @property
    def architecture(self) -> str:
        return self.sae.cfg.architecture()

    @property
    def W_dec(self) -> Any:
        return self.sae.W_dec.detach().float()

    @property
    def W_enc(self) -> Any:
        return self.sae.W_enc.detach().float()

    def encode(self, x_raw: Any, scale: float) -> Any:
        """Feature activations of raw activations ``x_raw`` (n, d_in); ``scale`` is the store's for this model."""
        import torch

        with torch.no_grad():
            x = x_raw * scale if self.sae.cfg.normalize_activations == SCALED_INPUT else x_raw
            return self.sae.encode(x.to(self.sae.W_enc.dtype)).float()

    def describe(self) -> str:
        hook = self.hook_name or "no hook recorded"
        return f"{self.architecture} SAE {self.d_in}->{self.d_sae} ({hook}) from {self.spec}"


def _json_beside(path: Path) -> Path | None:
    for cand in (path.with_suffix(".json"), path.parent / SAE_LENS_CFG):
        if cand.exists():
            return cand
    return None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 2**31


def check_sae_dir(path: Path) -> None:
    """Check an sae-lens directory before sae-lens reads it: ``cfg.json`` an object with sane ``d_in``,
    ``d_sae`` (and ``k``) and a known dtype; the weights a readable safetensors file whose tensors have
    the config's shapes and dtype. sae-lens itself turns a float16 file under a float32 config into
    float32 silently, and reports damage as assorted exception types; here each is one line.
    """
    from .store_format import check_tensors, load_safetensors, read_json_object

    fix = "the SAE directory is damaged: save or download the SAE again"
    cfg = read_json_object(path / SAE_LENS_CFG, fix)
    bad = [f"{k}={repr(cfg.get(k))[:30]}" for k in ("d_in", "d_sae") if not _positive_int(cfg.get(k))]
    if "k" in cfg and not (_positive_int(cfg["k"]) and _positive_int(cfg.get("d_sae")) and cfg["k"] <= cfg["d_sae"]):
        bad.append(f"k={repr(cfg['k'])[:30]}")
    if not isinstance(cfg.get("architecture", "standard"), str):
        bad.append(f"architecture={repr(cfg['architecture'])[:30]}")
    dtype = cfg.get("dtype", "float32")
    if dtype not in ("float32", "float16", "bfloat16", "float64"):
        bad.append(f"dtype={repr(dtype)[:30]}")
    if not bad:
        bad = _sae_lens_field_problems(cfg)
    if bad:
        raise DiffkitError(f"{path / SAE_LENS_CFG} has invalid {', '.join(bad)}: {fix}")
    tensors = load_safetensors(path / SAE_LENS_WEIGHTS, fix)
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    check_tensors(tensors, expected, str(path / SAE_LENS_WEIGHTS), fix, exact=False)
    wrong = sorted(k for k, v in tensors.items() if str(v.dtype) != f"torch.{dtype}")
    if wrong:
        raise DiffkitError(f"{path / SAE_LENS_WEIGHTS}: tensors {wrong[:4]} are not {dtype}, the dtype cfg.json "
                           f"names: {fix}")


def _sae_lens_field_problems(cfg: dict) -> list[str]:
    """Values of sae-lens config fields of the wrong type or outside their Literal (sae-lens would take
    most of them silently: an unknown normalization acts as none, a TopK SAE without k gets k=100)."""
    import dataclasses
    import typing

    from sae_lens import SAE

    arch = cfg.get("architecture", "standard")
    try:
        cls = SAE.get_sae_config_class_for_architecture(arch)
    except (KeyError, ValueError) as exc:
        return [f"architecture={arch!r} ({first_line(exc)})"]
    bad = []
    for f in dataclasses.fields(cls):
        if f.name not in cfg:
            continue
        v, t = cfg[f.name], f.type
        if typing.get_origin(t) is typing.Literal:
            ok = v in typing.get_args(t)
        elif t is bool:
            ok = isinstance(v, bool)
        elif t is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif t is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        elif t is str:
            ok = isinstance(v, str)
        else:
            ok = True
        if not ok:
            bad.append(f"{f.name}={repr(v)[:30]}")
    if "topk" in arch and "k" not in cfg:
        bad.append("k (missing: a TopK SAE needs it)")
    if "rescale_acts_by_decoder_norm" in cfg and not isinstance(cfg["rescale_acts_by_decoder_norm"], bool):
        bad.append(f"rescale_acts_by_decoder_norm={repr(cfg['rescale_acts_by_decoder_norm'])[:30]}")
    meta = cfg.get("metadata", {})
    if not isinstance(meta, dict) or not isinstance(meta.get("hook_name", ""), (str, type(None))):
        bad.append(f"metadata={repr(meta)[:40]}")
    return bad


def _load_plain(path: Path) -> Any:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from sae_lens import SAE

    from .store_format import read_json_object

    cfg_path = _json_beside(path)
    if cfg_path is None:
        raise DiffkitError(f"SAE file {path} has no JSON config beside it: write {path.with_suffix('.json').name} "
                           "with at least d_in and d_sae")
    cfg = read_json_object(cfg_path, "check the SAE's config file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DiffkitError(f"SAE {path} cannot be read ({first_line(exc)}): check the file") from None
    if "W_enc" in tensors and tensors["W_enc"].ndim != 2:
        raise DiffkitError(f"SAE file {path}: W_enc has shape {tuple(tensors['W_enc'].shape)}, not (d_in, d_sae)")
    need = ["W_enc", "W_dec", "b_enc", "b_dec"]
    missing = [k for k in need if k not in tensors]
    if missing:
        raise DiffkitError(f"SAE file {path} lacks {', '.join(missing)} (has {', '.join(sorted(tensors))}): it needs "
                           "W_enc, W_dec, b_enc, b_dec")
    d_in, d_sae = tensors["W_enc"].shape
    cfg.setdefault("d_in", int(d_in))
    cfg.setdefault("d_sae", int(d_sae))
    cfg.setdefault("architecture", "jumprelu" if "threshold" in tensors else "topk" if "k" in cfg else "standard")
    expected = {"W_enc": (cfg["d_in"], cfg["d_sae"]), "W_dec": (cfg["d_sae"], cfg["d_in"]), "b_enc": (cfg["d_sae"],),
                "b_dec": (cfg["d_in"],)}
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise DiffkitError(f"SAE file {path}: {key} has shape {tuple(tensors[key].shape)}, the config says "
                               f"{shape}: fix the config or the weights")
    try:
        sae = SAE.from_dict(cfg)
        sae.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()}, strict=True)
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as exc:
        raise DiffkitError(f"SAE {path} does not load as a {repr(cfg['architecture'])[:30]} sae-lens SAE: "
                           f"{first_line(exc)}") from None
    return sae


def _load_registry(spec: str, device: str) -> Any:
    from sae_lens import SAE
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    release, _, sae_id = spec.partition("/")
    directory = get_pretrained_saes_directory()
    if release not in directory:
        raise DiffkitError(f"SAE spec {spec!r} is neither a local path nor a release of sae-lens's registry: pass an "
                           "sae-lens directory, a .safetensors file, or RELEASE/SAE_ID")
    if sae_id not in directory[release].saes_map:
        known = ", ".join(list(directory[release].saes_map)[:5])
        raise DiffkitError(f"release {release!r} has no SAE {sae_id!r} (e.g. {known}): check the SAE id")
    return SAE.from_pretrained(release, sae_id, device=device)


def load_sae(spec: str, device: str = "cpu") -> LoadedSAE:
    """Load a SPEC (see the module docstring) and check its weights are finite."""
    import torch
    from sae_lens import SAE

    path = Path(spec)
    if spec.startswith("zoo:"):  # the embedded zoo's SAEs: zoo:NAME[@seedN][/blocks.1]
        from .zoo import sae_spec_dir

        path = sae_spec_dir(spec)
    if path.is_dir():
        if not (path / SAE_LENS_CFG).exists():
            raise DiffkitError(f"SAE directory {path} has no {SAE_LENS_CFG}: point at an sae-lens SAE directory")
        check_sae_dir(path)
        try:
            sae, source = SAE.load_from_disk(str(path), device=device), "sae-lens dir"
        except (KeyError, ValueError, RuntimeError, OSError, TypeError, AttributeError, AssertionError) as exc:
            raise DiffkitError(f"SAE directory {path} does not load with sae-lens: {first_line(exc)}") from None
    elif path.is_file():
        if path.suffix != ".safetensors":
            raise DiffkitError(f"SAE file {path} is not .safetensors: pass an sae-lens directory or a .safetensors file")
        sae, source = _load_plain(path).to(device), "safetensors"
    elif "/" in spec and not spec.startswith((".", "/")):
        sae, source = _load_registry(spec, device), "registry"
    else:
        raise DiffkitError(f"SAE {spec!r} does not exist: pass an sae-lens directory, a .safetensors file, zoo:NAME, "
                           "or RELEASE/SAE_ID")
    for name, param in sae.state_dict().items():
        if not torch.isfinite(param).all():
            bad = int((~torch.isfinite(param)).sum())
            raise DiffkitError(f"SAE {spec}: {name} has {bad} non-finite (NaN/inf) values: the weights are damaged, "
                               "load or train the SAE again")
    sae.eval()
    return LoadedSAE(spec, source, sae)


def check_against_store(sae: LoadedSAE, store: Any, source: str) -> list[str]:
    """Raise on a width or hook mismatch with the store's model ``source``; return warnings (no hook recorded)."""
    label = source.upper()
    d_model, hook = store.d_model(source), store.hook(source)
    if sae.d_in != d_model:
        raise DiffkitError(f"SAE {label} ({sae.spec}) has d_in {sae.d_in} but model {label} of the store has d_model "
                           f"{d_model} at {hook}: pass the SAE trained on model {label}'s {hook}")
    notes = []
    if sae.hook_name is None:
        notes.append(f"SAE {label} ({sae.spec}) records no hook name: assuming it reads {hook}, the store's hook")
        warnings.warn(notes[-1], stacklevel=2)
    elif sae.hook_name != hook:
        raise DiffkitError(f"SAE {label} ({sae.spec}) was trained on {sae.hook_name}, but the store holds model "
                           f"{label}'s {hook}: collect the store at {sae.hook_name} or pass the SAE for {hook}")
    return notes
