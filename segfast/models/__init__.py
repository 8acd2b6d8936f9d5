"""Models built from segfast layers, each switchable to stock torch layers (``backend="torch"``)."""
from segfast.models.simple_cnn import SimpleCNN

__all__ = ["SimpleCNN"]
