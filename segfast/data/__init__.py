"""Data sets: ones that ship inside installed packages (nothing is downloaded), and the user's own files."""

from segfast.data.digits import DigitsClassification
from segfast.data.digits_segmentation import DigitsSegmentation
from segfast.data.folder import FolderDataset, read_image, write_mask_png

__all__ = ["DigitsClassification", "DigitsSegmentation", "FolderDataset", "read_image", "write_mask_png"]
