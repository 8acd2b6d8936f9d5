"""affine_augment and RandomAffine against a float64 reference of the same affine sampling."""

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_close_to_reference,
    assert_mixed_devices_refused,
    assert_same_as_twin,
    dtype_id,
    seeded_classes,
    seeded_randn,
)

import segfast
from segfast.augment import AugmentCollate, RandomAffine, affine_theta, parse_augment


def _stock(image, theta, size):
    """The per-sample stock path: affine_grid + grid_sample (bilinear, zeros), as users write it."""
    grid = F.affine_grid(theta.to(image.dtype), (image.shape[0], image.shape[1], *size), align_corners=False)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _reference_mask(mask, theta, size, ignore_index):
    """Exact nearest in float64 with the op's arithmetic (halves round to even, as grid_sample)."""
    n, h, w = mask.shape
    out_h, out_w = size
    yn = (2 * torch.arange(out_h, dtype=torch.float64) + 1) / out_h - 1
    xn = (2 * torch.arange(out_w, dtype=torch.float64) + 1) / out_w - 1
    yy, xx = torch.meshgrid(yn, xn, indexing="ij")
    t = theta.double()
    sx = t[:, 0, 0, None, None] * xx + t[:, 0, 1, None, None] * yy + t[:, 0, 2, None, None]
    sy = t[:, 1, 0, None, None] * xx + t[:, 1, 1, None, None] * yy + t[:, 1, 2, None, None]
    px = torch.round(((sx + 1) * w - 1) / 2).long()
    py = torch.round(((sy + 1) * h - 1) / 2).long()
    inside = (px >= 0) & (px < w) & (py >= 0) & (py < h)
    flat = mask.reshape(n, -1).gather(1, (py.clamp(0, h - 1) * w + px.clamp(0, w - 1)).reshape(n, -1))
    return torch.where(
        inside, flat.reshape(n, out_h, out_w), torch.full_like(flat.reshape(n, out_h, out_w), ignore_index)
    )


def _batch(n=4, c=3, h=23, w=31, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g, dtype=torch.float64), torch.randint(0, 7, (n, h, w), generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("crop", [None, (17, 40)])
def test_matches_grid_sample_and_exact_nearest(device, dtype, layout, crop):
    image64, mask = _batch()
    transform = RandomAffine(rotate=40, flip=0.5, vflip=0.3, scale=(0.6, 1.8), translate=0.2, crop=crop)
    params = transform.sample(4, image64.shape[-2:], torch.Generator().manual_seed(1))
    size = crop or image64.shape[-2:]
    image = image64.to(dtype).to(memory_format=layout)
    ours, ours_mask = segfast.ops.affine_augment(
        image.to(device.device), mask.to(device.device), params.theta, size, ignore_index=255
    )
    ours, ours_mask = ours.cpu(), ours_mask.cpu()
    assert ours.is_contiguous(memory_format=layout) and ours.dtype == dtype
    assert_close_to_reference(ours, _stock(image, params.theta, size), _stock(image64, params.theta, size), "image")
    assert torch.equal(ours_mask, _reference_mask(mask, params.theta, size, 255))
    assert set(ours_mask.unique().tolist()) <= set(mask.unique().tolist()) | {255}  # labels never blended
    assert (ours_mask == 255).any()  # some pixels came from outside the frame


def test_nearest_agrees_with_grid_sample_inside_the_frame():
    _, mask = _batch()
    theta = RandomAffine(rotate=25, scale=(0.8, 1.3)).sample(4, mask.shape[-2:], torch.Generator().manual_seed(2)).theta
    ones = torch.ones(4, 1, *mask.shape[-2:], dtype=torch.float64)
    grid = F.affine_grid(theta, (4, 1, *mask.shape[-2:]), align_corners=False)
    stock = F.grid_sample(mask[:, None].double(), grid, mode="nearest", align_corners=False)[:, 0]
    inside = F.grid_sample(ones, grid, mode="nearest", align_corners=False)[:, 0] > 0
    _, ours = segfast.ops.affine_augment(ones, mask, theta, ignore_index=-1)
    assert torch.equal(ours[inside], stock[inside].long()) and (ours[~inside] == -1).all()


def test_geometry_flip_twice_and_rot90():
    image, mask = _batch(2, 2, 16, 16)
    zero, one = torch.zeros(2), torch.ones(2)
    false, true = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    flip = affine_theta(zero, one, torch.zeros(2, 2), true, false, (16, 16), (16, 16))
    once, once_mask = segfast.ops.affine_augment(image, mask, flip)
    assert torch.equal(once, image.flip(-1)) and torch.equal(once_mask, mask.flip(-1))
    twice, twice_mask = segfast.ops.affine_augment(once, once_mask, flip)
    assert torch.equal(twice, image) and torch.equal(twice_mask, mask)
    quarter = affine_theta(torch.full((2,), 90.0), one, torch.zeros(2, 2), false, false, (16, 16), (16, 16))
    turned, turned_mask = segfast.ops.affine_augment(image, mask, quarter)
    torch.testing.assert_close(turned, torch.rot90(image, 1, (-2, -1)), rtol=0, atol=1e-12)
    assert torch.equal(turned_mask, torch.rot90(mask, 1, (-2, -1)))


def test_seeded_generator_reproduces_and_collate_works():
    image, mask = _batch()
    transform = parse_augment("rotate=30,flip=0.5,scale=0.5:2,translate=0.1,crop=12x20")
    a = transform(image.float(), mask, torch.Generator().manual_seed(5))
    b = transform(image.float(), mask, torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2].theta, b[2].theta)
    assert a[0].shape == (4, 3, 12, 20) and a[1].shape == (4, 12, 20)
    collate = AugmentCollate(transform, torch.Generator().manual_seed(0))
    images, masks = collate([(image[i].float(), mask[i]) for i in range(4)])
    assert images.shape == (4, 3, 12, 20) and masks.dtype == torch.int64


def test_large_outputs_from_the_output_cache_are_ordinary_tensors():
    # outputs of 8 MiB and more come from cpu/output_cache.h: same values, and they share across
    # processes (DataLoader workers) like any tensor
    g = torch.Generator().manual_seed(0)
    image, mask = torch.rand(3, 3, 640, 640, generator=g), torch.randint(0, 9, (3, 640, 640), generator=g)
    theta = RandomAffine(rotate=30, flip=0.5).sample(3, (640, 640), g).theta
    ours, ours_mask = segfast.ops.affine_augment(image, mask, theta)
    assert ours.nbytes >= 8 << 20 and ours_mask.nbytes >= 8 << 20
    assert_close_to_reference(
        ours, _stock(image, theta, (640, 640)), _stock(image.double(), theta, (640, 640)), "image"
    )
    assert torch.equal(ours_mask, _reference_mask(mask, theta, (640, 640), 255))
    expected = ours.clone()
    shared = ours.share_memory_()
    assert shared.is_shared() and torch.equal(shared, expected)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(image, mask),
        batch_size=3,
        num_workers=1,
        collate_fn=AugmentCollate(RandomAffine(rotate=10)),
    )
    ((batch_images, batch_masks),) = list(loader)
    assert batch_images.shape == (3, 3, 640, 640) and batch_masks.shape == (3, 640, 640)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: segfast.ops.affine_augment(
                torch.rand(2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long), torch.zeros(2, 2, 3)
            ),
            ValueError,
            "mask must have shape",
        ),
        (
            lambda: segfast.ops.affine_augment(
                torch.rand(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), torch.zeros(2, 3, 3)
            ),
            ValueError,
            "theta must be",
        ),
        (
            lambda: segfast.ops.affine_augment(
                torch.rand(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.uint8), torch.zeros(1, 2, 3), ignore_index=-100
            ),
            ValueError,
            "does not fit",
        ),
        (
            lambda: segfast.ops.affine_augment(
                torch.rand(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long), torch.full((1, 2, 3), float("nan"))
            ),
            ValueError,
            "NaN",
        ),
        (
            lambda: segfast.ops.affine_augment(
                torch.rand(1, 3, 4, 4, requires_grad=True), torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 2, 3)
            ),
            ValueError,
            "not differentiable",
        ),
        (
            lambda: segfast.ops.affine_augment(torch.rand(1, 3, 4, 4), torch.zeros(1, 4, 4), torch.zeros(1, 2, 3)),
            TypeError,
            "mask dtype",
        ),
        (lambda: parse_augment("rotate=30,shear=4"), ValueError, "unknown key 'shear'"),
        (lambda: RandomAffine(scale=(2, 1)), ValueError, "scale must be"),
    ],
)
def test_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_opcheck_and_compile(device):
    image, mask = _batch(2, 2, 6, 7)
    theta = RandomAffine(rotate=20).sample(2, (6, 7), torch.Generator().manual_seed(0)).theta
    on_device = (image.float().to(device.device), mask.to(device.device), theta.to(device.device))
    torch.library.opcheck(torch.ops.segfast.affine_augment.default, (*on_device, 5, 4, 255))
    if device.name != "cpu":
        return  # compile: the graph calls the same op
    compiled = torch.compile(lambda x, m, t: segfast.ops.affine_augment(x, m, t, (5, 4)), fullgraph=True)
    out, out_mask = compiled(image.float(), mask, theta)
    ref, ref_mask = segfast.ops.affine_augment(image.float(), mask, theta, (5, 4))
    assert torch.equal(out, ref) and torch.equal(out_mask, ref_mask)


def test_mixed_devices_are_refused_without_touching_the_context(device):
    """One argument left on the CPU: a ValueError, the context alive (issue 15, defect 8)."""
    if device.name != "cuda":
        pytest.skip("needs a second device kind: a GPU beside the CPU")
    image = torch.rand(1, 3, 8, 8, device="cuda")
    theta = torch.eye(2, 3, dtype=torch.float64).unsqueeze(0)
    cases = [lambda: torch.ops.segfast.affine_augment(image, torch.zeros(1, 8, 8, dtype=torch.long), theta, 8, 8, 255)]
    assert_mixed_devices_refused(device, cases)


# ------------------------------------------- the CUDA kernels against their CPU twin, op by op


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("mask_dtype", [torch.uint8, torch.int64], ids=dtype_id)
def test_twin_affine_augment(accelerator, dtype, mask_dtype):
    image = seeded_randn(3, 3, 40, 44, dtype=dtype)
    mask = seeded_classes((3, 40, 44), 5, dtype=mask_dtype)
    angle = torch.tensor([0.3, -0.5, 0.0], dtype=torch.float64)
    scale = torch.tensor([1.1, 0.8, 1.0], dtype=torch.float64)
    theta = torch.zeros(3, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 1] = angle.cos() / scale, -angle.sin() / scale
    theta[:, 1, 0], theta[:, 1, 1] = angle.sin() / scale, angle.cos() / scale
    theta[:, 0, 2], theta[2, 0, 0] = 0.1, -1.0  # a shift; the third sample flipped
    assert_same_as_twin(*accelerator.both("affine_augment", image, mask, theta, 35, 38, 255), "image, mask")
