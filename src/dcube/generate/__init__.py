"""Synthetic images from the step-1 model: class counts, synthesis to PNG + manifest, and the
:class:`SyntheticSet` that only a training split accepts.

Stage order: data -> diffusion -> **generate** -> features -> classify -> evaluate. This package
imports only data, diffusion, config and utils.
"""

from dcube.generate.counts import balance_counts, per_class_counts
from dcube.generate.synthesize import MANIFEST, synthesize
from dcube.generate.synthetic import SYNTHETIC_PREFIX, SyntheticSet, assert_real, augment_train, load_synthetic

__all__ = ["MANIFEST", "SYNTHETIC_PREFIX", "SyntheticSet", "assert_real", "augment_train",
           "balance_counts", "load_synthetic", "per_class_counts", "synthesize"]
