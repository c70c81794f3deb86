"""`affectray <verb>`: one entry point for every job.

Each verb lives in the module that owns it, which provides
``add_arguments(parser)`` and ``main(args) -> dict`` (the job's summary); the
jobs/ scripts call the same two functions, so CLI, jobs and tests share code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# verb -> (module, one-line help). Modules are imported only for the verb used,
# so `affectray --help` stays fast and a verb's heavy imports cost nothing elsewhere.
VERBS: dict[str, tuple[str, str]] = {
    "synth": ("affectray.sample.synth", "write the built-in sample corpus (drawn faces + real-face videos)"),
    "ingest": ("affectray.ingest.job", "turn videos, frame folders or image folders into aligned-face segment shards"),
    "pretrain": ("affectray.train.pretrain", "pretrain VideoMAE / MAE-DFER on segment shards with Ray Train"),
    "finetune": (
        "affectray.train.finetune",
        "fine-tune an expression classifier (CFC-SP, CNN-GRU, ESR, MAE-DFER, ...)",
    ),
    "cascade": ("affectray.combine.cascade", "join coarse and negative CFC-SP checkpoints into one 8-class model"),
    "ensemble": ("affectray.combine.ensemble", "join fine-tuned classifiers into one weighted ensemble (ABAW2021)"),
    "evaluate": ("affectray.train.evaluation", "score a classifier checkpoint on shards: macro F1, accuracy, UAR, WAR"),
    "predict": ("affectray.predict", "find and label every face in a few images or videos, at once (no Ray)"),
    "label": ("affectray.label.job", "label whole video corpora with a classifier checkpoint (one Parquet per video)"),
    "tune": ("affectray.tune", "sweep fine-tuning hyperparameters with Ray Tune + Optuna (TPE) + ASHA, resumable"),
    "demo": ("affectray.demo", "run the platform end to end on a local Ray with the sample corpus"),
    "models": ("affectray.models.builtin", "list the built-in pretrained models (builtin:<name>) and model families"),
    "import-checkpoint": (
        "affectray.importers.job",
        "turn a published model (HSEmotion) into a classifier checkpoint; its pickle is read, never run",
    ),
}


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; only ``verb``'s module is imported and given its arguments (all, when None)."""
    parser = argparse.ArgumentParser(
        prog="affectray",
        description="A Ray platform for video facial expression recognition.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, (module_name, help_text) in VERBS.items():
        if verb is not None and name != verb:
            sub.add_parser(name, help=help_text)  # listed in --help, its module never imported
            continue
        module = importlib.import_module(module_name)
        verb_parser = sub.add_parser(
            name, help=help_text, description=module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(verb_parser)
        verb_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    from affectray.runtime import run_job

    argv = sys.argv[1:] if argv is None else argv
    # The first word that names a verb picks the one module to import (`affectray --help` imports none).
    verb = next((word for word in argv if word in VERBS), "")
    args = build_parser(verb).parse_args(argv)
    return run_job(args._module.main, args)


if __name__ == "__main__":
    sys.exit(main())
