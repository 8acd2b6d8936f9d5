"""Datasets that ship inside installed packages (nothing is downloaded)."""
from segfast.data.digits import DigitsClassification

__all__ = ["DigitsClassification"]
