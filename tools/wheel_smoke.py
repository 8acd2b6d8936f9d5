"""Smoke test of an installed segfast wheel: run from outside the source tree, in the venv it was
installed into. Checks that the metadata matches the running torch and the build, and runs every op
once (forward and backward) against stock PyTorch on CPU. With a CUDA build and no GPU, the CUDA
kernels are checked as registered only. Exits non-zero on the first failure."""

import importlib.metadata
import pathlib

import torch
import torch.nn.functional as F

import segfast
from segfast import ops

OPS = [
    "batch_norm_act",
    "conv2d_act",
    "linear_act",
    "max_pool2d",
    "avg_pool2d",
    "cross_entropy",
    "confusion_matrix",
    "dice_sums",
    "focal_loss",
    "sigmoid_sums",
    "sigmoid_focal_loss",
    "affine_augment",
]


def check_metadata() -> None:
    assert "site-packages" in pathlib.Path(segfast.__file__).parts, f"segfast imported from {segfast.__file__}"
    version = importlib.metadata.version("segfast")
    major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    cuda = segfast.build_info()["cuda"]
    flavour = "cu" + torch.version.cuda.replace(".", "") if cuda else "cpu"
    assert version.endswith(f"+{flavour}.torch{major_minor}"), (version, torch.__version__, cuda)
    assert f"torch=={major_minor}.*" in importlib.metadata.requires("segfast")
    print(f"segfast {version} in torch {torch.__version__}: metadata ok")


def check_ops_on_cpu() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(
        ops.conv2d_act(x, w, b, padding=1, activation="relu"), F.relu(F.conv2d(x, w, b, padding=1))
    )
    rows = torch.randn(5, 4, dtype=torch.float64)
    lin_w = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(ops.linear_act(rows, lin_w, None, activation="silu"), F.silu(F.linear(rows, lin_w)))
    torch.testing.assert_close(ops.max_pool2d(x, 2), F.max_pool2d(x, 2))
    torch.testing.assert_close(ops.avg_pool2d(x, 3, 2, 1), F.avg_pool2d(x, 3, 2, 1))
    logits = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 4, (2, 5, 5))
    loss = ops.cross_entropy(logits, target)
    torch.testing.assert_close(loss, F.cross_entropy(logits, target))
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(grad, torch.autograd.grad(F.cross_entropy(logits, target), logits)[0])
    matrix = ops.confusion_matrix(logits.detach(), target, 4)
    assert int(matrix.sum()) == target.numel()
    mask = (target > 1).unsqueeze(1)
    binary = logits[:, :1]
    for loss in (
        ops.dice_loss(logits, target),
        ops.focal_loss(logits, target),
        ops.dice_bce_loss(binary, mask),
        ops.focal_loss(binary, mask, mode="binary"),
    ):
        assert torch.isfinite(loss) and torch.isfinite(torch.autograd.grad(loss, logits)[0]).all()
    torch.testing.assert_close(
        ops.dice_bce_loss(binary, mask, lambda_dice=0.0), F.binary_cross_entropy_with_logits(binary, mask.double())
    )
    identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64).expand(2, 2, 3)
    image, mask = ops.affine_augment(x.detach(), target.new_zeros(2, 9, 9), identity)
    torch.testing.assert_close(image, x.detach())
    assert (mask == 0).all()
    running = (torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    expected = F.relu(F.batch_norm(x, running[0].clone(), running[1].clone(), training=True) + x)
    torch.testing.assert_close(ops.batch_norm_act(x, *running, training=True, residual=x), expected)
    print("every op ran on CPU and matched stock PyTorch")


def check_cuda_registration() -> None:
    if not segfast.build_info()["cuda"]:
        return
    missing = [name for name in OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"segfast::{name}", "CUDA")]
    assert not missing, f"CUDA kernels not registered: {missing}"
    print(
        f"CUDA kernels registered for {len(OPS)} ops (archs {segfast.build_info()['cuda_archs']})"
        + ("" if torch.cuda.is_available() else "; no GPU here, not run")
    )


if __name__ == "__main__":
    check_metadata()
    check_ops_on_cpu()
    check_cuda_registration()
