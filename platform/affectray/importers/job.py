"""`affectray import-checkpoint`: another project's published model as an affectray classifier checkpoint.

    affectray import-checkpoint enet_b0_8_best_afew.pt ckpt/hsemotion-b0 --format hsemotion
    affectray label videos/ out/ --checkpoint ckpt/hsemotion-b0

FILE is read without running anything in it (a pickle that asks to call anything
but a tensor rebuilder is refused, naming what it calls), the model is rebuilt with
one of the platform's own families and its weights are loaded strictly: every
tensor placed, none left over. OUT (a directory or s3:// URI) gets an ordinary
checkpoint (model.safetensors + meta.json with the label set, the preprocessing and
the source file's sha256) that evaluate, label, predict and finetune take as it is.

Formats:
    hsemotion    HSEmotion / EmotiEffLib EfficientNet-B0 (224 px) and -B2 (260 px) models
                 (enet_b0_8_best_afew.pt, enet_b0_8_best_vgaf.pt, enet_b2_8.pt, enet_b2_7.pt):
                 8 AffectNet classes (Anger, Contempt, Disgust, Fear, Happiness, Neutral,
                 Sadness, Surprise) or 7 (no Contempt), named by ABAW class (Contempt: Other)
    mae-dfer     MAE-DFER (sunlicai/MAE-DFER) LGI-Former checkpoints, 16 x 160 x 160 clips:
                 a DFEW / FERV39k fine-tuned model becomes a clip classifier (DFEW's 7 classes
                 Happiness, Sadness, Neutral, Anger, Surprise, Disgust, Fear; other datasets
                 need --classes); the VoxCeleb2 pretraining checkpoint becomes a pretraining
                 checkpoint that finetune takes as init
    poster-v2    POSTER V2 (zczcwh/POSTER_V2) training checkpoints, 224 px aligned faces
                 (raf-db-, affectnet-7-, affectnet-8-, caer-s-model_best.pth): RAF-DB's 7 classes,
                 AffectNet's 7 or 8, CAER-S's 7, in each dataset's ImageFolder order (the file's
                 name tells the 7-class ones apart, or --classes names them)
"""

from __future__ import annotations

import importlib
import tempfile
from pathlib import Path
from typing import Any

from affectray import storage

# format -> the module whose import_checkpoint(path, out, classes=..., box_margin=...) converts it
FORMATS: dict[str, str] = {
    "hsemotion": "affectray.importers.hsemotion",
    "mae-dfer": "affectray.importers.mae_dfer",
    "poster-v2": "affectray.importers.poster_v2",
}


def add_arguments(parser) -> None:
    parser.add_argument("file", metavar="FILE", help="the published checkpoint file (a local path or s3:// URI)")
    parser.add_argument("out", metavar="OUT", help="the checkpoint directory to write (a local path or s3:// URI)")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS), help="who published FILE")
    parser.add_argument(
        "--classes",
        nargs="+",
        metavar="NAME",
        help="the model's class names in its output order (default: the format's published order); "
        "commas also separate names",
    )
    parser.add_argument(
        "--box-margin",
        type=float,
        default=None,
        help="crop faces as detector boxes with this margin (default: the format's own: hsemotion and mae-dfer "
        "boxes with margin 0.0, poster-v2 aligned faces)",
    )


def _classes(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def main(args) -> dict[str, Any]:
    converter = importlib.import_module(FORMATS[args.format])
    classes = _classes(getattr(args, "classes", None))
    margin = getattr(args, "box_margin", None)
    if storage.is_remote(args.file):
        with tempfile.TemporaryDirectory(prefix="affectray-import-") as tmp:
            local = Path(tmp, args.file.rstrip("/").rsplit("/", 1)[-1])
            local.write_bytes(storage.read_bytes(args.file))
            result = converter.import_checkpoint(local, args.out, classes=classes, box_margin=margin)
    else:
        result = converter.import_checkpoint(
            Path(args.file.removeprefix("file://")), args.out, classes=classes, box_margin=margin
        )
    print(
        f"imported {args.file} ({args.format}: {result['architecture']}, {len(result['classes'])} classes, "
        f"{result['tensors']} tensors) into {result['checkpoint']}"
    )
    return {"job": "import-checkpoint", **result}
