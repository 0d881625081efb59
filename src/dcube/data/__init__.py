"""The data stage: MedMNIST, image folders and CSV manifests -> train/val/test tensors.

``load_data(cfg, seed, run_dir)`` returns a :class:`DataBundle` of three :class:`Split`s whose
images are float32 (N, C, H, W) in [-1, 1]; every problem is a :class:`DataError` naming the
file, class or config field.
"""

from dcube.data.bundle import DataBundle, DataError, Split
from dcube.data.dataset import load_data, split_labels
from dcube.data.images import read_image
from dcube.data.medmnist import MEDMNIST, MedMNISTInfo

__all__ = ["Split", "DataBundle", "DataError", "load_data", "split_labels", "MEDMNIST", "MedMNISTInfo", "read_image"]
