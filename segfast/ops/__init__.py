"""Functional segfast ops, argument for argument like ``torch.nn.functional``.

Each op family lives in its own module (schema in csrc/ops.cpp, kernels in
csrc/<backend>/<family>.*, fake kernel + autograd here).
"""

from torch.nn.functional import l1_loss

from segfast.ops._activation import ACTIVATIONS
from segfast.ops.augment import affine_augment
from segfast.ops.batch_norm_act import batch_norm_act, sync_batch_norm_act
from segfast.ops.conv2d_act import conv2d_act
from segfast.ops.cross_entropy import cross_entropy
from segfast.ops.linear_act import linear_act
from segfast.ops.metrics import confusion_matrix
from segfast.ops.pooling import avg_pool2d, max_pool2d
from segfast.ops.segmentation_losses import dice_loss, focal_loss
from segfast.ops.sigmoid_losses import dice_bce_loss
from segfast.ops.softmax_stats import softmax_stats

__all__ = [
    "ACTIVATIONS",
    "affine_augment",
    "avg_pool2d",
    "batch_norm_act",
    "confusion_matrix",
    "conv2d_act",
    "cross_entropy",
    "dice_bce_loss",
    "dice_loss",
    "focal_loss",
    "l1_loss",
    "linear_act",
    "max_pool2d",
    "softmax_stats",
    "sync_batch_norm_act",
]
