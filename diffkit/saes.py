"""SAE specs -> loaded sae-lens SAEs, checked against an activation store.

A SPEC is one of:

1. a local **sae-lens directory** (``cfg.json`` + ``sae_weights.safetensors``), loaded with
   ``SAE.load_from_disk``;
2. a plain **safetensors file** with ``W_enc`` (d_in, d_sae), ``W_dec`` (d_sae, d_in), ``b_enc``,
   ``b_dec`` (and ``threshold`` for JumpReLU) plus a JSON config beside it (``NAME.json`` or
   ``cfg.json``) holding at least ``d_in`` and ``d_sae``; ``architecture`` defaults to ``jumprelu``
   when a threshold is present, ``topk`` when the config has ``k``, else ``standard``; built with
   ``SAE.from_dict`` so the encoding is sae-lens's own;
3. ``zoo:NAME`` (or ``zoo:NAME@seedN``): an SAE of the embedded zoo, an sae-lens directory;
4. ``RELEASE/SAE_ID`` from sae-lens's pretrained registry (``pretrained_saes.yaml``), loaded with
   ``SAE.from_pretrained`` (needs the hub; the SAE id may itself contain slashes).

Encoding always goes through the SAE's own ``encode``, so JumpReLU thresholds, TopK's k, and the
``layer_norm`` / ``constant_norm_rescale`` normalizations are sae-lens's. The one normalization
sae-lens leaves to the caller, ``expected_average_only_in`` (inputs scaled to mean norm sqrt(d_in)),
is applied here with the store's scale for that model, which is exactly sqrt(d)/mean norm.
Otherwise raw activations are encoded: that is what SAEs are trained on.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DiffkitError

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


def _load_plain(path: Path) -> Any:
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from sae_lens import SAE

    cfg_path = _json_beside(path)
    if cfg_path is None:
        raise DiffkitError(f"SAE file {path} has no JSON config beside it: write {path.with_suffix('.json').name} "
                           "with at least d_in and d_sae")
    try:
        cfg = json.loads(cfg_path.read_text())
        tensors = load_file(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as exc:
        raise DiffkitError(f"SAE {path} cannot be read ({exc}): check the file") from None
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
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise DiffkitError(f"SAE {path} does not load as a {cfg['architecture']} sae-lens SAE: "
                           f"{str(exc).splitlines()[0]}") from None
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
    if spec.startswith("zoo:"):  # the embedded zoo's SAEs: zoo:NAME or zoo:NAME@seedN
        from .zoo import sae_spec_dir

        path = sae_spec_dir(spec)
    if path.is_dir():
        if not (path / SAE_LENS_CFG).exists():
            raise DiffkitError(f"SAE directory {path} has no {SAE_LENS_CFG}: point at an sae-lens SAE directory")
        try:
            sae, source = SAE.load_from_disk(str(path), device=device), "sae-lens dir"
        except (KeyError, ValueError, RuntimeError, OSError, json.JSONDecodeError) as exc:
            raise DiffkitError(f"SAE directory {path} does not load with sae-lens: {str(exc).splitlines()[0]}") from None
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
