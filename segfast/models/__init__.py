"""Models built from segfast layers, each switchable to stock torch layers (``backend="torch"``)
with the same parameter names."""

from segfast.models.fcn import FCN
from segfast.models.simple_cnn import SimpleCNN
from segfast.models.unet import UNet

__all__ = ["FCN", "SimpleCNN", "UNet"]
