"""Run the platform end to end on a local Ray with the built-in sample corpus.

Writes the sample corpus, ingests its aligned-frame folders (with EXPR labels) and its
real-face videos (MTCNN detection, alignment, tracking) into shards, pretrains a tiny
VideoMAE on the shards, fine-tunes an 8-class expression classifier validated on
held-out identities, labels the sample videos with it (one Parquet per video, timelines,
an HTML report), then labels the real-face videos with the built-in FER2013 model and runs
`affectray predict` on a real photo, and prints where every output is. Minutes on a laptop CPU.

The fine-tuned smoke classifier learnt drawn faces in a hundred steps: it shows the
pipeline, not expressions. The built-in model (FER2013's mini-Xception) is the one that
reads real faces.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from affectray.runtime import emit_summary, init_ray

REPO_ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", nargs="?", default="demo-output", help="output directory (default: demo-output)")
    parser.add_argument("--fresh", action="store_true", help="delete OUT first instead of resuming into it")


def _step(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def main(args: argparse.Namespace) -> None:
    from affectray.config import load_config
    from affectray.ingest.job import IngestConfig, run_ingest
    from affectray.report import loss_curve, shard_contact_sheet
    from affectray.sample.shards import SAMPLE_VIDEOS
    from affectray.sample.synth import SynthConfig, write_sample_corpus
    from affectray.train.pretrain import PretrainConfig, run_pretrain

    start = time.perf_counter()
    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    init_ray()
    outputs: dict[str, Any] = {}

    _step("1/8 sample corpus: drawn faces with EXPR labels + real-face videos")
    corpus = out / "sample-corpus"
    if not (corpus / "synth.json").exists():
        write_sample_corpus(corpus, SynthConfig(seed=0, num_videos=SAMPLE_VIDEOS))
    outputs["corpus"] = str(corpus)

    _step("2/8 ingest aligned-frame folders (Aff-Wild2 layout) with annotations")
    frames_root = str(out / "shards" / "sample")
    outputs["ingest_frames"] = run_ingest(
        IngestConfig(
            source=str(corpus / "aligned"),
            out=frames_root,
            layout="aligned-frames",
            annotations=str(corpus / "annotations"),
            dataset="sample",
            image_size=64,
            segment_length=16,
        )
    )
    outputs["faces_png"] = shard_contact_sheet(frames_root, str(out / "shards" / "sample-faces.png"))

    _step("3/8 ingest real-face videos: PyAV decode, MTCNN, 5-point alignment, tracks")
    videos_root = str(out / "shards" / "videos")
    outputs["ingest_videos"] = run_ingest(
        IngestConfig(source=str(corpus / "videos"), out=videos_root, dataset="sample-videos", image_size=112)
    )
    outputs["video_faces_png"] = shard_contact_sheet(videos_root, str(out / "shards" / "video-faces.png"), faces=16)

    _step("4/8 pretrain a tiny VideoMAE on the shards (Ray Data → Ray Train)")
    config = load_config(
        PretrainConfig,
        REPO_ROOT / "jobs" / "configs" / "pretrain-smoke.yaml",
        [f"data.root={frames_root}", f"run.storage={out / 'runs'}"],
    )
    outputs["pretrain"] = run_pretrain(config)
    history = _history(out / "runs" / config.run.name)
    if history:
        outputs["pretrain_loss_png"] = loss_curve(
            history, str(out / "runs" / "pretrain-loss.png"), title="VideoMAE tiny"
        )

    _step("5/8 fine-tune an 8-class expression classifier, validated on held-out identities")
    from affectray.train.finetune import FinetuneConfig, run_finetune

    finetune_config = load_config(
        FinetuneConfig,
        REPO_ROOT / "jobs" / "configs" / "finetune-smoke.yaml",
        [f"data.root={frames_root}", f"run.storage={out / 'runs'}"],
    )
    outputs["finetune"] = run_finetune(finetune_config)
    metrics = outputs["finetune"]["metrics"]
    print(f"  held-out macro F1 {metrics['f1_macro']:.3f} (chance 0.125), accuracy {metrics['accuracy']:.3f}")
    outputs["confusion_png"] = outputs["finetune"]["confusion_png"]

    _step("6/8 label the sample videos with the fine-tuned checkpoint (per frame, per face)")
    from affectray.label.job import LabelConfig, run_label

    outputs["label"] = run_label(
        LabelConfig(
            videos=str(corpus / "videos"),
            out=str(out / "labels"),
            checkpoint=outputs["finetune"]["checkpoint"],
            detect_max_side=320,
            # A demo re-run may have fine-tuned a new checkpoint: relabel the three videos with it
            # instead of refusing to mix two models' labels in one OUT.
            overwrite=True,
        )
    )
    outputs["label_report"] = outputs["label"]["report"]

    _step("7/8 label the real-face videos with the built-in FER2013 model (builtin:fer-minixception)")
    real_videos = out / "real-videos"
    real_videos.mkdir(exist_ok=True)
    for video in sorted((corpus / "videos").glob("astronaut_*.mp4")):
        shutil.copy(video, real_videos / video.name)
    outputs["label_builtin"] = run_label(
        LabelConfig(videos=str(real_videos), out=str(out / "labels-builtin"), detect_max_side=320)
    )
    outputs["label_builtin_report"] = outputs["label_builtin"]["report"]

    _step("8/8 affectray predict on a real photo (the astronaut, scikit-image's sample photo)")
    import cv2
    from skimage import data

    photo = out / "astronaut.jpg"
    cv2.imwrite(str(photo), cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    from affectray.models.builtin import DEFAULT_CHECKPOINT
    from affectray.models.inference import load_classifier
    from affectray.predict import Predictor, format_table, predict_inputs

    (prediction,) = predict_inputs(
        [str(photo)], Predictor(load_classifier(DEFAULT_CHECKPOINT)), out=str(out / "predict")
    )
    print(format_table([prediction]))
    outputs["predict_jpg"] = prediction.annotated

    summary = {
        "job": "demo",
        "out": str(out),
        "seconds": round(time.perf_counter() - start, 1),
        **{k: v for k, v in outputs.items() if isinstance(v, str)},
        "pretrain": {k: outputs["pretrain"][k] for k in ("steps", "first_loss", "last_loss", "checkpoint")},
        "finetune": {
            "f1_macro": metrics["f1_macro"],
            "accuracy": metrics["accuracy"],
            "checkpoint": outputs["finetune"]["checkpoint"],
        },
        "label": {k: outputs["label"][k] for k in ("videos", "ok", "failed", "frames", "frames_per_second")},
        "label_builtin": {k: outputs["label_builtin"][k] for k in ("model", "videos", "ok", "frames", "faces")},
        "predict": [{"label": f.label, "box": f.box} for f in prediction.faces],
    }
    # The table is the last thing on screen: Ray's workers stop first (their buffered logs and
    # progress bars would otherwise keep arriving after it), then the JSON summary, then the table.
    import ray

    ray.shutdown()
    emit_summary(summary)
    _step("outputs")
    for name, value in outputs.items():
        where = (
            value if isinstance(value, str) else value.get("manifest") or value.get("checkpoint") or value.get("out")
        )
        print(f"  {name:18s} {where}", flush=True)
    return None


def _history(run_dir: Path) -> list[dict[str, Any]]:
    """Every report of a run, from its metrics.csv: the numeric columns, blanks dropped."""
    import pandas as pd

    path = run_dir / "metrics.csv"
    if not path.exists():
        return []
    table = pd.read_csv(path).select_dtypes("number")
    return [{k: v for k, v in row.items() if v == v} for row in table.to_dict("records")]  # v != v: NaN
