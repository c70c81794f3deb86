"""affectray: a Ray platform for video facial expression recognition.

Ingest video corpora into aligned-face shards, pretrain video masked autoencoders,
fine-tune expression classifiers, search hyperparameters and label whole corpora,
on a laptop's local Ray or a many-GPU cluster, unchanged.
"""

__version__ = "0.1.0"
