"""Fine-tune an expression classifier on segment shards with Ray Train.

    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/finetune-smoke.yaml
    affectray finetune --config jobs/configs/finetune-smoke.yaml --set model.name=cnn_gru

Any registered model trains here (``affectray.models.registry``): frame
classifiers, the CFC-SP stages (``class_view: coarse`` and ``negative``, two
runs on the same shards, joined by ``affectray cascade``, train/cascade.py) or the whole cascade
in one run (``model.name: cfc_cascade``), smooth predicting (``cfc_sp``),
CNN-GRU / CNN-Transformer windows, the ESR ensemble and the MAE-DFER clip
classifier (``video_encoder_classifier``, optionally initialised from a
pretraining checkpoint, with layer-wise lr decay). Frame models read frames,
window models read clips of ``data.num_frames`` frames. Each model owns its loss
and its probabilities (``affectray.models.heads``): the task below asks the model
and never branches on a family. Weighted ensembles are not trained here: they are
joined from trained checkpoints by ``affectray ensemble``.

Every epoch ends with validation on held-out videos (or a split), scored with
macro F1, accuracy, UAR, WAR and ABAW2; the best checkpoint by
``eval.metric`` is kept at ``<run>/best_checkpoint``, self-describing, so
``affectray evaluate`` and ``affectray label`` take it as it is. The run also
gets ``metrics.csv`` (every report) and ``confusion.png`` (best checkpoint).
With test-time crops (``eval.crops``) the best checkpoint is scored once more,
with them, at the end: those are the run's figures.

Valence/arousal (ABAW VA): ``loss.va_weight > 0`` gives the model a VA head
(``va_head``; the frame family has one), reads each sample's valence and arousal
(``data.va``, NaN = unannotated) and trains expression_weight * CE + va_weight *
(2 - CCC_valence - CCC_arousal); validation adds ``ccc_valence``, ``ccc_arousal``
and ``ccc_mean`` (selectable as ``eval.metric``). ``loss.expression_weight: 0``
trains VA alone, on corpora without expression labels too.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from affectray import checkpoints as ckpt
from affectray import storage
from affectray.config import ConfigError, config_to_dict, location
from affectray.data import shards
from affectray.data.loaders import DataConfig, build_dataset, class_counts, iter_train_batches, preprocessing_of
from affectray.ingest.archives import unpacked_source
from affectray.ingest.job import IngestConfig, run_ingest
from affectray.labels import ABAW8, LabelSet, remap
from affectray.models.backbones import apply_state_dict, load_weights_file
from affectray.models.builtin import builtin_checkpoint
from affectray.models.inference import BUILTIN_PREFIX
from affectray.models.registry import ModelConfig, create_model_from_description, model_info
from affectray.runtime import add_config_job_arguments, run_config_job
from affectray.train.evaluation import CLASS_VIEWS, evaluate_model, view_targets
from affectray.train.loop import (
    BEST_CHECKPOINT_DIR,
    METRICS_FILE,
    OptimConfig,
    RunConfig,
    TrainConfig,
    fit,
    param_groups,
    planned_steps,
)
from affectray.train.optim import param_groups_lrd

logger = logging.getLogger("affectray.finetune")

__all__ = [
    "ClassifierTask",
    "EvalConfig",
    "FinetuneConfig",
    "LossConfig",
    "class_weights",
    "run_finetune",
]

SELECTABLE_METRICS = ("f1_macro", "accuracy", "uar", "war", "abaw2", "ccc_valence", "ccc_arousal", "ccc_mean")
VA_METRICS = ("ccc_valence", "ccc_arousal", "ccc_mean")  # only with loss.va_weight > 0
Metric = Literal["f1_macro", "accuracy", "uar", "war", "abaw2", "ccc_valence", "ccc_arousal", "ccc_mean"]


def _finetune_data() -> DataConfig:
    return DataConfig(mode="frame", label="center", image_size=224, val_fraction=0.2)


@dataclass
class LossConfig:
    # Class imbalance (Aff-Wild2 has ~50x more Neutral than Fear): weight each class's
    # cross-entropy by inverse frequency, its square root (milder), or not at all.
    class_weights: Literal["none", "inverse", "sqrt_inverse"] = "sqrt_inverse"
    label_smoothing: float = 0.0
    # ESR's diversity term: set as the model's own diversity_weight argument; None = the model's setting.
    diversity_weight: float | None = None
    # Valence/arousal: > 0 trains a VA head with ABAW's loss (2 - CCC_valence - CCC_arousal,
    # batch CCC over annotated rows) beside the expression cross-entropy; 0 = no VA head.
    va_weight: float = 0.0
    expression_weight: float = 1.0  # the cross-entropy's weight; 0 with va_weight > 0 trains VA alone


@dataclass
class EvalConfig:
    # Validation data: rows of this split of data.root, or the shards at root, or
    # (both unset) the whole videos that data.val_fraction holds out of data.root.
    split: str | None = None
    root: str | None = location(None)
    # Picks the best checkpoint; ccc_mean (ABAW's VA score) and ccc_* need loss.va_weight > 0.
    metric: Metric = "f1_macro"
    batch_size: int = 64
    smooth_window: int = 1  # >1: average predictions over this many frames of a video before scoring
    # Test-time flip: score the average of each face's and its mirror image's prediction. The
    # checkpoint records it (preprocessing.test_flip): label and predict then predict the same way.
    flip: bool = False
    # Test-time crops (null: none): five crops of this side, a fraction of the input's (the corners and
    # the centre, resampled to the input size), averaged with the full view (and, with flip, all with
    # their mirrors): FER2013's ten-crop testing. Six times a validation's predictions, so epochs
    # validate without them and pick the best checkpoint; that one is then scored once with them,
    # which are the run's figures; the checkpoint records them (preprocessing.test_crops).
    crops: float | None = None
    # Keep the validation inputs (decoded uint8, N x S x S x 3 bytes) in the training worker after the
    # first validation, and score later epochs from memory: no Ray Data pass per epoch.
    cache: bool = False


@dataclass
class FinetuneConfig:
    data: DataConfig = field(default_factory=_finetune_data)
    # Each family has its own default backbone (frame: resnet18); a YAML `model:` that names
    # another family (poster_v2, ma_net, fer_minixception: fixed trunks) inherits none.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="frame"))
    # The classes the head predicts. auto: the data's own label set, as its manifest names it
    # (basic7 for FER2013, RAF-DB, DFEW, AffectNet-7; affectnet8 with Contempt; abaw8 for
    # Aff-Wild2 and older manifests). abaw8: the 8 Aff-Wild2 classes; basic7: without Other;
    # affectnet8: Other named Contempt; coarse / negative: one CFC-SP stage (5 / 4 classes).
    class_view: Literal["auto", "abaw8", "basic7", "affectnet8", "coarse", "negative"] = "auto"
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Start from: a checkpoint of this platform (pretraining: the video encoder; a classifier:
    # its weights) or a local .safetensors/.pth file; null = random init.
    init: str | None = location(None)
    # Every tensor of the model must come from init, with its shape, and init hold no other
    # (a key or shape that differs is an error naming it). False: a backbone-only transfer,
    # only the tensors that fit load (the log and summary say how many). A pretraining
    # checkpoint always transfers its encoder alone, all of it.
    init_strict: bool = True
    layer_decay: float | None = None  # layer-wise lr decay for ViT encoders (MAE-DFER uses 0.75)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, weight_decay=0.05, warmup_steps=20))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=32, epochs=10, checkpoint_every=500))
    run: RunConfig = field(default_factory=lambda: RunConfig(name="finetune"))
    sample_corpus_if_empty: bool = False  # smoke configs: build the sample shards into data.root first
    # Recipes: ingest jobs run first, each only while its `out` holds no finished corpus (no
    # manifest; an interrupted one resumes); a `source` may be a tar archive (FER2013's).
    prepare: list[IngestConfig] = field(default_factory=list)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.data.label == "none":
            raise ConfigError("data.label='none' gives no targets: use center, frames or clip")
        if self.eval.split is None and self.eval.root is None and self.data.val_fraction <= 0:
            raise ConfigError(
                "no validation data: set data.val_fraction > 0 (held-out videos), eval.split or eval.root"
            )
        if self.eval.crops is not None and not 0.0 < self.eval.crops < 1.0:
            raise ConfigError(f"eval.crops is a side fraction in (0, 1) (e.g. 0.9), got {self.eval.crops}")
        self._check_va()

    def _check_va(self) -> None:
        """VA training is on with loss.va_weight > 0; then the loader reads VA targets (data.va)."""
        loss, va = self.loss, self.loss.va_weight > 0
        if loss.va_weight < 0 or loss.expression_weight < 0:
            raise ConfigError(f"loss.va_weight={loss.va_weight} and loss.expression_weight={loss.expression_weight}: "
                              "weights are >= 0")  # fmt: skip
        if loss.expression_weight == 0 and not va:
            raise ConfigError("loss.expression_weight=0 and loss.va_weight=0: nothing to train")
        if self.eval.metric in VA_METRICS and not va:
            raise ConfigError(f"eval.metric={self.eval.metric!r} scores valence/arousal: set loss.va_weight > 0")
        if loss.expression_weight == 0 and self.eval.metric not in VA_METRICS:
            raise ConfigError(f"loss.expression_weight=0 trains valence/arousal alone: eval.metric="
                              f"{self.eval.metric!r} scores the untrained expression head; use ccc_mean")  # fmt: skip
        if self.data.va and not va:
            raise ConfigError("data.va=true reads valence/arousal targets that only loss.va_weight > 0 trains")
        if va:
            self.data = dataclasses.replace(self.data, va=True)


# --------------------------------------------------------------------------- model + data


def dataset_class_view(manifest: dict[str, Any]) -> str:
    """The class view a shard corpus's own label set asks for (``class_view: auto``).

    The ingest job names it in the manifest (``dataset_label_set``); manifests written
    before it did are Aff-Wild2-style ABAW8 corpora.
    """
    try:
        return shards.dataset_label_set(manifest)  # basic7, affectnet8 or abaw8: each a class view
    except storage.StorageError as error:
        raise ConfigError(f"class_view: auto: {error}") from None


def with_class_view(config: FinetuneConfig, manifest: dict[str, Any]) -> FinetuneConfig:
    """``config`` with ``class_view: auto`` replaced by the data's own view (others are kept)."""
    if config.class_view != "auto":
        return config
    return dataclasses.replace(config, class_view=dataset_class_view(manifest))


def model_description(config: FinetuneConfig) -> dict[str, Any]:
    """The registry description of the model to train, with the view's class count.

    What the family registered (``registry.ModelInfo``) decides the rest: a fixed
    class count (the CFC cascade's 8) must be the view's, and a family that
    fine-tuning does not train (the weighted ensemble) is refused here, on the driver.
    With ``class_view: auto`` (not yet resolved against the data) the class count is
    left unset and only the family and its arguments are checked.
    """

    name, view = config.model.name, config.class_view
    info = model_info(name)  # ModelError for an unknown name
    if info.finetune is not None:
        raise ConfigError(f"model.name={name!r} is not fine-tuned: {info.finetune}")
    kwargs = config.model.to_kwargs()
    if config.loss.diversity_weight is not None:
        kwargs["diversity_weight"] = config.loss.diversity_weight  # the model's argument: its describe() records it
    if config.loss.va_weight > 0:
        if not info.va_head:
            raise ConfigError(
                f"loss.va_weight={config.loss.va_weight} trains a valence/arousal head, which model.name={name!r} "
                "does not have: use model.name=frame (or set loss.va_weight=0)"
            )
        if kwargs.setdefault("va_head", True) is not True:
            raise ConfigError("model.extra.va_head=false but loss.va_weight > 0 trains that head: drop one of them")
    elif kwargs.get("va_head"):
        raise ConfigError("model.extra.va_head=true needs loss.va_weight > 0 (e.g. 1.0), or the head never trains")
    if view == "auto":
        return {"name": name, "kwargs": kwargs}
    classes = len(CLASS_VIEWS[view])
    if info.num_classes is not None:  # no num_classes argument: the family always predicts its own classes
        if info.num_classes != classes or "num_classes" in kwargs:
            fits = [v for v, labels in CLASS_VIEWS.items() if len(labels) == info.num_classes]
            raise ConfigError(
                f"model.name={name!r} always predicts {info.num_classes} classes: leave model.num_classes unset "
                f"and use class_view={fits[0] if fits else '?'} (not {view!r})"
            )
        return {"name": name, "kwargs": kwargs}
    kwargs.setdefault("num_classes", classes)
    if kwargs["num_classes"] != classes:
        raise ConfigError(f"model.num_classes={kwargs['num_classes']} but class_view={view!r} has {classes} classes")
    return {"name": name, "kwargs": kwargs}


def check_geometry(model, data: DataConfig) -> None:
    """Frame models read frames; window models read clips as long as their window."""
    kind = getattr(model, "input_kind", "frame")
    if kind == "frame" and data.mode != "frame":
        raise ConfigError(f"{type(model).__name__} classifies single frames: set data.mode=frame")
    if kind == "window":
        if data.mode != "clip":
            raise ConfigError(f"{type(model).__name__} reads windows of frames: set data.mode=clip")
        if data.num_frames != model.window:
            raise ConfigError(
                f"data.num_frames={data.num_frames} but the model's window is {model.window} frames: make them equal"
            )


def validation_data(config: FinetuneConfig) -> tuple[DataConfig, bool]:
    """(data config, holdout) of the validation pass."""
    if config.eval.root is not None:
        return dataclasses.replace(config.data, root=config.eval.root, split=config.eval.split, val_fraction=0.0), False
    if config.eval.split is not None:
        return dataclasses.replace(config.data, split=config.eval.split, val_fraction=0.0), False
    return config.data, True


def training_data(config: FinetuneConfig) -> DataConfig:
    """Training rows: all of data.root's selection except held-out videos (when holdout validates)."""
    if config.eval.root is None and config.eval.split is not None:
        return dataclasses.replace(config.data, val_fraction=0.0)
    return config.data


def class_weights(config: FinetuneConfig, model=None) -> list[float] | None:
    """Per-class loss weights of the view from the training rows' label counts (label columns only).

    None with ``loss.class_weights=none``, or for a ``model`` whose loss takes no class
    weights (``model.class_weighted`` False: the CFC cascade's coarse/negative split is
    its own answer to imbalance).
    """

    if config.loss.class_weights == "none" or (model is not None and not model.class_weighted):
        return None
    data = training_data(config)
    counts8 = class_counts(dataclasses.replace(data, label="clip" if data.label == "clip" else "center"), len(ABAW8))
    view = view_targets(np.repeat(np.arange(len(ABAW8)), counts8), config.class_view)
    counts = np.bincount(view[view >= 0], minlength=len(CLASS_VIEWS[config.class_view])).astype(np.float64)
    present = counts > 0
    if not present.any():
        return None
    weights = np.ones_like(counts)
    weights[present] = counts[present].sum() / (present.sum() * counts[present])
    if config.loss.class_weights == "sqrt_inverse":
        weights[present] = np.sqrt(weights[present])
    weights[present] /= weights[present].mean()  # mean 1 over present classes: the lr keeps its meaning
    return weights.round(6).tolist()


def classes_in_order(
    model, state: dict[str, torch.Tensor], meta: dict[str, Any], classes: LabelSet | None, *, uri: str, strict: bool
) -> tuple[dict[str, torch.Tensor], str | None]:
    """A classifier checkpoint's state with its output rows put in the run's class order.

    The built-in FER2013 model predicts Anger .. Surprise, Neutral; a basic7 run wants
    Neutral first. Rows of the model's ``classifier`` module (``head``, as timm names
    it) are matched by class name. Classes the run has and the checkpoint lacks: an
    error, or with ``init_strict: false`` a fresh head. Returns (state, what was done).
    """
    if classes is None or not meta.get("label_set"):
        return state, None
    source = LabelSet.from_dict(meta["label_set"])
    if source.classes == classes.classes:
        return state, None
    rows = remap(np.arange(len(classes)), classes, source)  # run class i -> its row in the checkpoint
    head = getattr(model, "classifier", None)
    keys = [k for k in (f"{head}.weight", f"{head}.bias") if k in state] if head else []
    if (rows >= 0).all() and keys:
        index = torch.as_tensor(rows)
        return {**state, **{k: state[k][index] for k in keys}}, f"head rows reordered from {source.name}"
    reason = f"{uri} predicts {list(source.classes)}, the run {list(classes.classes)}" + (
        "" if keys else f", and {type(model).__name__} names no classifier module to reorder"
    )
    if strict:
        raise ConfigError(f"{reason}: set init_strict: false to start from its other weights with a fresh head")
    return {k: v for k, v in state.items() if not (head and k.startswith(f"{head}."))}, f"fresh head ({reason})"


def initialise(model, uri: str, strict: bool = True, classes: LabelSet | None = None) -> dict[str, Any]:
    """Load starting weights into a fresh model (see FinetuneConfig.init and init_strict).

    Returns what the job summary records: ``{"uri", "kind", "loaded", "of", "strict"}``,
    ``loaded`` of the model's ``of`` tensors. Raises WeightsMismatchError (a user error
    naming the keys) when ``strict`` and the weights do not fit exactly, and whenever
    nothing fits. ``classes``: the run's label set; a classifier checkpoint's head is put
    in its order by class name (:func:`classes_in_order`).
    """

    total = len(model.state_dict())
    if uri.startswith(BUILTIN_PREFIX):  # a packaged model's converted checkpoint (converted once, then cached)
        uri = str(builtin_checkpoint(uri.removeprefix(BUILTIN_PREFIX)))
    if not storage.exists(storage.join(uri, ckpt.META_FILE)):
        fit = load_weights_file(model, uri, strict=strict, opt_out="init_strict: false")
        kind = "file"
    else:
        with ckpt.open_checkpoint(uri) as directory:
            meta = ckpt.read_meta(directory)
            state = ckpt.load_weights(directory)
        if meta.get("kind") == "pretrain":
            from affectray.models.video_classifier import load_encoder_from_pretrain

            encoder = load_encoder_from_pretrain(model, state, source=uri)  # the encoder, all of it, or an error
            loaded = len(encoder.state_dict())
            logger.info("initialised the video encoder, %d of the model's %d tensors, from %s", loaded, total, uri)
            return {"uri": uri, "kind": "pretrain", "loaded": loaded, "of": total, "strict": "encoder"}
        state, head = classes_in_order(model, state, meta, classes, uri=uri, strict=strict)
        fit = apply_state_dict(model, state, source=uri, strict=strict, opt_out="init_strict: false")
        kind = "checkpoint"
        if head:
            logger.info("init %s: %s", uri, head)
    logger.info("initialised %d of %d tensors from %s (init_strict: %s)", len(fit.loaded), total, uri, strict)
    return {"uri": uri, "kind": kind, "loaded": len(fit.loaded), "of": total, "strict": strict}


# --------------------------------------------------------------------------- the task


class ClassifierTask:
    """The fine-tuning task for the shared loop (train/loop.py)."""

    evaluates = True

    def __init__(
        self,
        config: FinetuneConfig,
        description: dict[str, Any],
        weights: list[float] | None,
        manifest: dict[str, Any] | None = None,
    ) -> None:
        if config.class_view not in CLASS_VIEWS:
            raise ConfigError(f"class_view={config.class_view!r}: resolve it against the data first (with_class_view)")
        self.config = config
        self.description = description
        self.weights = weights
        self.manifest = manifest or {}
        self.last_eval: dict[str, Any] = {}
        self.built_description: dict[str, Any] | None = None  # model.describe() of the built model
        self.eval_cache: list[dict[str, Any]] = []  # validation batches, with eval.cache (filled on the worker)

    # -- model
    def build_model(self):
        model = create_model_from_description(self.description)
        if self.config.init:
            initialise(model, self.config.init, self.config.init_strict, CLASS_VIEWS[self.config.class_view])
        # Checkpoints describe the model as built, not as configured: describe() leaves out
        # construction-time weight files (driver-local paths a label actor could not open);
        # the checkpoint carries the trained weights itself.
        self.built_description = model.describe()
        return model

    def param_groups(self, model, weight_decay: float):

        if self.config.layer_decay is not None:
            return param_groups_lrd(model, weight_decay, self.config.layer_decay)
        return param_groups(model, weight_decay)

    # -- data
    def batches(self, shard, epoch: int, device):

        data, batch_size = self.config.data, self.config.train.batch_size
        # Classifiers take clips as windows of frames [B, T, C, H, W], straight from the loader.
        # With data.va the loader adds the VA targets [B, 2] as a last element: passed on as they are.
        for inputs, targets, *va in iter_train_batches(shard, data, batch_size, epoch, device, clip_layout="BTCHW"):
            yield inputs, view_targets(targets, self.config.class_view), *va

    def batch_size_of(self, batch) -> int:
        return int(batch[0].shape[0])

    # -- loss
    def loss(self, model, batch):
        inputs, targets, *va = batch
        outputs = model(inputs)  # through the DDP wrapper, so gradients synchronise
        weights = torch.tensor(self.weights, device=inputs.device) if self.weights else None
        loss = self.config.loss
        # VA targets come only with loss.va_weight > 0, for a model with a VA head (model_description).
        va_terms = (
            {"va_targets": va[0], "expression_weight": loss.expression_weight, "va_weight": loss.va_weight}
            if va
            else {}
        )
        # The bare model owns its loss (models/heads.py): the cascade's stages, ESR's branches, ...
        return ckpt.unwrap(model).loss(
            outputs, targets, class_weights=weights, label_smoothing=loss.label_smoothing, **va_terms
        )

    # -- evaluation and checkpoints
    def evaluate(self, model, device) -> dict[str, float]:

        data, holdout = validation_data(self.config)
        result = evaluate_model(
            model,
            data,
            holdout=holdout,
            class_view=self.config.class_view,
            batch_size=self.config.eval.batch_size,
            device=device,
            smooth_window=self.config.eval.smooth_window,
            flip=self.config.eval.flip,
            cache=self.eval_cache if self.config.eval.cache else None,
        )
        self.last_eval = result.metrics
        # Expression figures need labelled rows (a VA-only corpus has none), VA figures a VA head.
        keys = (*SELECTABLE_METRICS, "count", "va_count")
        return {f"val_{k}": float(result.metrics[k]) for k in keys if k in result.metrics}

    def score(self, metrics: dict[str, float]) -> float | None:
        return metrics.get(f"val_{self.config.eval.metric}")

    def checkpoint_meta(self) -> dict[str, Any]:

        if self.built_description is None:
            raise RuntimeError("checkpoint_meta() before build_model(): a checkpoint describes the model as built")
        data = self.config.data
        val_data, holdout = validation_data(self.config)
        return {
            "kind": "classifier",
            "model": self.built_description,
            "label_set": CLASS_VIEWS[self.config.class_view].to_dict(),
            "class_view": self.config.class_view,
            # What the model predicts: "va" = valence and arousal (a VA head: loss.va_weight > 0).
            "outputs": ["expression", "va"] if self.config.loss.va_weight > 0 else ["expression"],
            "preprocessing": dataclasses.replace(
                preprocessing_of(data), test_flip=self.config.eval.flip, test_crops=self.config.eval.crops
            ).to_dict(),
            # What validation read, so `affectray evaluate` can score the same frames again.
            "validation": {
                "data": config_to_dict(val_data),
                "holdout": holdout,
                "smooth_window": self.config.eval.smooth_window,
                "metrics": self.last_eval,
            },
            "class_weights": self.weights,
            "config": config_to_dict(self.config),
            "data_manifest": {k: self.manifest.get(k) for k in ("dataset", "source", "counts", "image_size")},
        }


# --------------------------------------------------------------------------- driver


def prepare_data(jobs: list[IngestConfig]) -> list[dict[str, Any]]:
    """Run the recipe's ingest jobs whose output holds no finished corpus; their summaries."""
    done = []
    for job in jobs:
        if storage.exists(storage.join(job.out, shards.MANIFEST_NAME)):
            logger.info("%s already holds an ingested corpus: not ingesting %s again", job.out, job.source)
            continue
        logger.info("ingesting %s into %s (%s)", job.source, job.out, job.layout)
        with unpacked_source(job.source) as source:
            summary = run_ingest(dataclasses.replace(job, source=source))
        done.append({"source": job.source, "out": job.out, "rows": summary["rows"], "failed": summary["failed"]})
    return done


def score_with_test_crops(checkpoint: str, config: FinetuneConfig) -> dict[str, Any]:
    """The run's validation of ``checkpoint`` again, with the test-time crops (``eval.crops``).

    On the driver, as ``affectray evaluate`` scores (the training workers are gone by now),
    from the checkpoint as label and predict load it: what they predict is what is scored.
    """
    from affectray.models.inference import load_classifier

    device = "cuda" if torch.cuda.is_available() else "cpu"
    classifier = load_classifier(checkpoint, device=device)
    data, holdout = validation_data(config)
    pre = classifier.preprocessing
    result = evaluate_model(
        classifier.model, data, holdout=holdout, class_view=config.class_view, batch_size=config.eval.batch_size,
        device=device, smooth_window=config.eval.smooth_window, flip=pre.test_flip, crops=pre.test_crops,
    )  # fmt: skip
    return result.metrics


def without_classes(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as the summary reports them: the class names are said once, at its top level."""
    return {k: v for k, v in metrics.items() if k != "classes"}


def run_finetune(config: FinetuneConfig, callbacks: list | None = None) -> dict[str, Any]:
    """Fine-tune on Ray Train; returns the job summary (metrics of the best checkpoint and its URI).

    ``callbacks``: Ray Train callbacks (a Tune sweep passes its report callback).
    """
    from affectray.sample.shards import ensure_sample_shards

    start = time.perf_counter()
    early = model_description(config)  # before any work (ingest, Ray): a config mistake fails at once
    if config.class_view == "auto":  # the class count waits for the data; the family's arguments need not
        create_model_from_description(early)
    if config.sample_corpus_if_empty:
        ensure_sample_shards(config.data.root, image_size=config.data.image_size, seed=config.seed)
    prepared = prepare_data(config.prepare)
    manifest = shards.read_manifest(config.data.root)
    config = with_class_view(config, manifest)
    description = model_description(config)
    probe = create_model_from_description(description)  # fails here, on the driver, for a bad model config
    check_geometry(probe, config.data)
    # Init weights that do not fit fail here too; the summary records how many tensors loaded.
    classes = CLASS_VIEWS[config.class_view]
    init = initialise(probe, config.init, config.init_strict, classes) if config.init else None
    num_params = sum(p.numel() for p in probe.parameters())
    weights = class_weights(config, probe)
    del probe
    steps = planned_steps(training_data(config), config.optim, config.train, config.run)
    task = ClassifierTask(config, description, weights, manifest)
    result, run_uri = fit(
        task,
        config.optim,
        config.train,
        config.run,
        datasets={"train": build_dataset(training_data(config), train=True)},
        total_steps=steps,
        seed=config.seed,
        callbacks=callbacks,
    )
    best_uri = storage.join(run_uri, BEST_CHECKPOINT_DIR)
    with ckpt.open_checkpoint(best_uri) as directory:
        best = ckpt.read_meta(directory)
    metrics = best["validation"]["metrics"]
    selection_metrics = None
    if config.eval.crops:
        selection_metrics, metrics = metrics, score_with_test_crops(best_uri, config)
        logger.info(
            "best checkpoint with its test-time crops: %s %.4f (the epoch's validation without them: %.4f)",
            config.eval.metric, metrics[config.eval.metric], selection_metrics[config.eval.metric],
        )  # fmt: skip
    confusion_png = storage.join(run_uri, "confusion.png")
    from affectray.report import confusion_matrix_png

    if "confusion" in metrics:  # a VA-only corpus has no expression labels to confuse
        confusion_matrix_png(
            metrics["confusion"], metrics["classes"], confusion_png,
            title=f"{config.run.name}: step {best['step']}, {config.eval.metric} {metrics[config.eval.metric]:.3f}"
            + (f" (test-time flip and crops of {config.eval.crops})" if selection_metrics else ""),
        )  # fmt: skip
    else:
        confusion_png = None
    last = result.metrics or {}
    return {
        "job": "finetune",
        "model": config.model.name,
        "class_view": config.class_view,
        "num_classes": len(metrics["classes"]),
        "classes": metrics["classes"],
        "parameters": num_params,
        "steps": int(last.get("step", 0)),
        "planned_steps": steps,
        "first_loss": last.get("first_loss"),
        "last_loss": last.get("loss"),
        "resumed_from_step": last.get("resumed_from_step", 0),
        "class_weights": weights,
        "init": init,
        "prepared": prepared,
        "best_step": best["step"],
        "metric": config.eval.metric,
        "metrics": without_classes(metrics),
        # With eval.crops: `metrics` are the best checkpoint's with its test-time crops, and these the
        # validation that picked it (without them).
        **({"selection_metrics": without_classes(selection_metrics)} if selection_metrics else {}),
        "test_time": {"flip": config.eval.flip, "crops": config.eval.crops},
        "checkpoint": best_uri,
        "metrics_csv": storage.join(run_uri, METRICS_FILE),
        "confusion_png": confusion_png,
        "run": run_uri,
        "seconds": round(time.perf_counter() - start, 1),
    }


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:

    add_config_job_arguments(parser)


def main(args: argparse.Namespace) -> dict[str, Any]:

    return run_config_job(FinetuneConfig, args, run_finetune)
