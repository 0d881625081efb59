"""Step 2a: hyper-features of the frozen denoiser: extraction, KS layer selection (Eq. 6), cache."""

from dcube.features.extract import FeatureExtractor, extract
from dcube.features.ks import Selection, select_ks_map

__all__ = ["FeatureExtractor", "extract", "Selection", "select_ks_map"]
