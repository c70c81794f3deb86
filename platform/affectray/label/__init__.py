"""Batch labeling of video corpora: inputs, the Ray Data pipeline, outputs, the job."""

from affectray.label.job import LabelConfig, run_label

__all__ = ["LabelConfig", "run_label"]
