"""Step 2a: hyper-features of the frozen denoiser: extraction, KS layer selection, cache."""

from dcube.features.extract import FeatureExtractor, extract
from dcube.features.ks import Selection, ks_pvalues, select_layers

__all__ = ["FeatureExtractor", "extract", "Selection", "ks_pvalues", "select_layers"]
