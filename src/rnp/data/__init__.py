"""Image data: in-memory image sets, datasets loaded from disk, the embedded demo dataset, the
defender's clean subset, augmented batches, and the poisoned and triggered sets attacks make."""

from rnp.data.clean_subset import select_clean_subset
from rnp.data.demo import DEMO_DATASET_PATH, load_demo
from rnp.data.images import ImageSet, as_image_set, to_uint8
from rnp.data.loader import iterate_batches, random_crop_flip
from rnp.data.poisoned import PoisonedSet, TriggeredSet
from rnp.data.sources import DatasetSplits, load_dataset

__all__ = ["DEMO_DATASET_PATH", "DatasetSplits", "ImageSet", "PoisonedSet", "TriggeredSet", "as_image_set",
           "iterate_batches", "load_dataset", "load_demo", "random_crop_flip", "select_clean_subset",
           "to_uint8"]
