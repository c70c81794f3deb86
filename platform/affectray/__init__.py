"""affectray: a Ray platform for video facial expression recognition.

Ingest video corpora into aligned-face shards, pretrain video masked autoencoders,
fine-tune expression classifiers, search hyperparameters and label whole corpora,
on a laptop's local Ray or a many-GPU cluster, unchanged.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import affectray` stays light (no torch) until load_model is used.
    if name == "load_model":
        from affectray.models.inference import load_model

        return load_model
    raise AttributeError(f"module 'affectray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "load_model"])
