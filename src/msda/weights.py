"""DenseSM-E weights: the authors' per-member ``.pt`` state dicts and our safetensors + manifest.

Our format is a directory with ``weights.safetensors`` (keys ``<member>.<param>``) and
``manifest.json`` (schema, members, architecture, provenance); it never uses pickle. The authors' ``.pt`` files
are pickles, read with ``torch.load(weights_only=True)`` so that a downloaded file cannot run code.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from msda.errors import WeightsError
from msda.io import atomic_path
from msda.network.model import MAX_MEMBERS, DenseSM, DenseSME, MemberSpec
from msda.network.spec import DEFAULT_ARCH, ArchSpec
from msda.provenance import provenance
from msda.schema import DEFAULT_SCHEMA, FeatureSchema

FORMAT = "msda.densesm-e"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "weights.safetensors"
_PAIR = re.compile(r"(\d+)_(\d+)")


# ----- our format ---------------------------------------------------------------------------
def save_ensemble(ensemble: DenseSME, path: str | Path, provenance_info: dict[str, Any] | None = None,
                  force: bool = False) -> Path:
    """Write ``path/`` with weights.safetensors and manifest.json, atomically.

    An existing ``path`` is replaced only when it holds msda weights (or ``force``).
    """
    path = Path(path)
    tensors = {
        f"{spec.name}.{key}": value.detach().cpu().contiguous()
        for spec, member in zip(ensemble.specs, ensemble.members)
        for key, value in member.state_dict().items()
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "schema": ensemble.schema.to_dict(),
        "members": [{"name": s.name, "depth": s.depth, "width": s.width} for s in ensemble.specs],
        "arch": ensemble.arch.to_dict(),
        "provenance": provenance_info if provenance_info is not None else provenance(),
    }
    with atomic_path(path, "weights", force=force) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path.with_name(MANIFEST)
    try:
        manifest = json.loads(file.read_text())
    except OSError as exc:
        raise WeightsError(f"{file}: cannot read manifest ({exc.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise WeightsError(f"{file}: manifest is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise WeightsError(f"{file}: not an msda weights manifest (format {found!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise WeightsError(f"{file}: format_version {version!r} is not one this msda reads ({FORMAT_VERSION})")
    if not isinstance(manifest.get("schema"), dict):
        raise WeightsError(f"{file}: no schema table in the manifest")
    return manifest


def _load_ours(path: Path, schema: FeatureSchema | None) -> DenseSME:
    directory = path if path.is_dir() else path.parent
    manifest = read_manifest(directory)
    recorded = FeatureSchema.from_dict(manifest["schema"], source=str(directory / MANIFEST))
    if schema is not None and not schema.same_layout(recorded):
        raise WeightsError(
            f"{directory}: weights were trained with schema {recorded.name!r} "
            f"({recorded.n_features} features), not {schema.name!r} ({schema.n_features} features)"
        )
    members = manifest.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
        raise WeightsError(f"{directory / MANIFEST}: 'members' must be a non-empty list of {{name, depth, width}}")
    if len(members) > MAX_MEMBERS:
        raise WeightsError(f"{directory / MANIFEST}: {len(members)} members; at most {MAX_MEMBERS}")
    try:
        specs = [MemberSpec(m["depth"], m["width"]) for m in members]
    except KeyError as exc:
        raise WeightsError(f"{directory / MANIFEST}: a member lacks {exc.args[0]!r}") from None
    except WeightsError as exc:
        raise WeightsError(f"{directory / MANIFEST}: {exc}") from None
    try:
        tensors = load_file(str(directory / TENSORS))
    except (OSError, SafetensorError) as exc:
        raise WeightsError(f"{directory / TENSORS}: cannot read safetensors ({exc})") from None
    arch = ArchSpec.from_dict(manifest["arch"], f"{directory / MANIFEST} arch") if "arch" in manifest else DEFAULT_ARCH
    ensemble = DenseSME(specs, schema=recorded, arch=arch)
    for spec, member in zip(specs, ensemble.members):
        prefix = spec.name + "."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        _load_member(member, state, f"{directory / TENSORS} member {spec.name}")
    names = {s.name for s in specs}
    stray = sorted({k.split(".", 1)[0] for k in tensors} - names)
    if stray:
        raise WeightsError(f"{directory / TENSORS}: tensors of members {stray} not in the manifest")
    ensemble.provenance = manifest.get("provenance", {})  # type: ignore[attr-defined]
    ensemble.calibration = manifest.get("calibration")  # type: ignore[attr-defined]  (msda calibrate)
    return ensemble


# ----- the authors' format ------------------------------------------------------------------
def parse_member_file(path: Path) -> MemberSpec:
    """(depth, width) from a file name such as ``DenseSM_3_64.pt`` (first ``d_w`` pair)."""
    m = _PAIR.search(path.stem)
    if not m:
        raise WeightsError(f"{path}: no '<depth>_<width>' pair in the file name (e.g. 'DenseSM_3_64.pt')")
    try:
        return MemberSpec(int(m.group(1)), int(m.group(2)))
    except WeightsError as exc:
        raise WeightsError(f"{path}: {exc} (from the file name)") from None


def _authors_state(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise the key layouts the authors' code writes: bare DWN, ``0.``-prefixed, ``fe.``/``mv.``."""
    if raw and all(k.startswith("0.") for k in raw):
        raw = {k[2:]: v for k, v in raw.items()}
    if any(k.startswith("fe.") for k in raw):
        raw = {
            ("out." + k[3:] if k.startswith("mv.") else k[3:] if k.startswith("fe.") else k): v
            for k, v in raw.items()
        }
    return raw


def _load_authors(path: Path, schema: FeatureSchema | None) -> DenseSME:
    if schema is not None and not schema.is_default:
        raise WeightsError(
            f"{path}: the authors' weights fit only the default Table 1 schema (15 scalars + 3 x 46 "
            f"series, 153 features); schema {schema.name!r} has {schema.n_features} features"
        )
    files = sorted(path.glob("*.pt")) if path.is_dir() else [path]
    if not files:
        raise WeightsError(f"{path}: no .pt member files in this directory")
    if len(files) > MAX_MEMBERS:
        raise WeightsError(f"{path}: {len(files)} .pt member files; at most {MAX_MEMBERS}")
    specs = [parse_member_file(f) for f in files]
    order = sorted(range(len(files)), key=lambda i: (specs[i].depth, specs[i].width))
    files, specs = [files[i] for i in order], [specs[i] for i in order]
    seen: dict[str, Path] = {}
    for f, s in zip(files, specs):
        if s.name in seen:
            raise WeightsError(f"{f}: member {s.name} given twice (also {seen[s.name].name})")
        seen[s.name] = f
    ensemble = DenseSME(specs, schema=DEFAULT_SCHEMA)
    for f, spec, member in zip(files, specs, ensemble.members):
        try:
            raw = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise WeightsError(
                f"{f}: not a plain state dict of tensors: it holds other Python objects, which msda never "
                "runs; do not trust this file"
            ) from None
        except Exception as exc:  # a cut or foreign file fails in many ways
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise WeightsError(f"{f}: not a readable PyTorch state dict ({reason})") from None
        if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
            raise WeightsError(f"{f}: expected a state dict (names -> tensors), found {type(raw).__name__}")
        _load_member(member, _authors_state(raw), f"{f} (member {spec.name})")
    ensemble.provenance = {"source": "authors' .pt state dicts", "path": str(path)}  # type: ignore[attr-defined]
    return ensemble


def save_authors(ensemble: DenseSME, directory: str | Path, prefix: str = "DenseSM", force: bool = False) -> Path:
    """Write one ``<prefix>_<d>_<w>.pt`` state dict per member, as the authors' code reads them."""
    directory = Path(directory)
    with atomic_path(directory, "weights", force=force) as tmp:
        tmp.mkdir()
        for spec, member in zip(ensemble.specs, ensemble.members):
            torch.save(member.state_dict(), tmp / f"{prefix}_{spec.depth}_{spec.width}.pt")
    return directory


# ----- shared -------------------------------------------------------------------------------
def _load_member(member: DenseSM, state: dict[str, torch.Tensor], where: str) -> None:
    """Strict load with a message that names the member and the key."""
    expected = member.state_dict()
    missing = [k for k in expected if k not in state]
    if missing:
        raise WeightsError(f"{where}: missing key {missing[0]!r} ({len(missing)} missing)")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise WeightsError(f"{where}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected)")
    for k, v in expected.items():
        got = state[k]
        if not isinstance(got, torch.Tensor):
            raise WeightsError(f"{where}: key {k!r} is a {type(got).__name__}, not a tensor")
        if tuple(got.shape) != tuple(v.shape):
            raise WeightsError(
                f"{where}: key {k!r} has shape {tuple(got.shape)}, the model expects {tuple(v.shape)}"
            )
        if v.is_floating_point():
            if not got.is_floating_point():
                raise WeightsError(f"{where}: key {k!r} holds {got.dtype} values; weights must be floating point")
            bad = int((~torch.isfinite(got)).sum())
            if bad:
                raise WeightsError(f"{where}: key {k!r} holds {bad} non-finite values (NaN or inf)")
    member.load_state_dict(state, strict=True)


def weights_fingerprint(path: str | Path) -> str:
    """``sha256:<hex>`` of the model a weights path holds: our tensors with the manifest's schema
    and members (not its provenance: the same model trained again gives the same fingerprint), or
    the bytes of the authors' ``.pt`` files."""
    import hashlib

    from msda.io import file_fingerprint

    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if (directory / MANIFEST).exists() and (path.is_dir() or path.suffix == ".safetensors" or path.name == MANIFEST):
        manifest = read_manifest(directory)
        model = [manifest["schema"], manifest.get("members")]
        if manifest.get("arch", DEFAULT_ARCH.to_dict()) != DEFAULT_ARCH.to_dict():
            model.append(manifest["arch"])  # (weights of the default spec keep the fingerprint they had)
        digest = hashlib.sha256(json.dumps(model, sort_keys=True).encode())
        return file_fingerprint(directory / TENSORS, digest)
    files = sorted(path.glob("*.pt")) if path.is_dir() else [path]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        file_fingerprint(f, digest)
    return "sha256:" + digest.hexdigest()


def load_ensemble(path: str | Path, schema: FeatureSchema | None = None) -> DenseSME:
    """Load DenseSM-E weights from our directory, the authors' directory of ``.pt``, or one file.

    ``schema`` (optional) is checked against the weights' schema. The model is in eval mode.
    """
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file or directory")
    if (path.is_dir() and (path / MANIFEST).exists()) or path.suffix == ".safetensors" or path.name == MANIFEST:
        ensemble = _load_ours(path, schema)
    elif path.is_dir() or path.suffix in (".pt", ".pth"):
        ensemble = _load_authors(path, schema)
    else:
        raise WeightsError(f"{path}: not a weights directory, .safetensors or .pt file")
    ensemble.source = str(path)  # type: ignore[attr-defined]
    return ensemble.eval()
