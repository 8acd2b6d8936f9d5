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


MEAN, STD = [0.485, 0.456, 0.406, 0.5], [0.229, 0.224, 0.225, 0.25]


def _colour_reference(warped, color, mean, std):
    """affine_augment's colour rule on the warped image in [0, 1], in warped's dtype:
    clamp(contrast * u + brightness, 0, 1), then (u - mean) / std."""
    if color is not None:
        c = color.to(warped.dtype)
        warped = (c[:, 0, None, None, None] * warped + c[:, 1, None, None, None]).clamp(0, 1)
    if mean is not None:
        channels = warped.shape[1]
        m = torch.tensor(mean[:channels], dtype=warped.dtype)[:, None, None]
        s = torch.tensor(std[:channels], dtype=warped.dtype)[:, None, None]
        warped = (warped - m) / s
    return warped


def _bytes_batch(n, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, c), generator=g, dtype=torch.uint8), torch.randint(
        0, 7, (n, h, w), generator=g
    )


@pytest.mark.parametrize("channels", [3, 4, 1, 2])
@pytest.mark.parametrize("source", ["nhwc", "nchw", "list"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("out_format", [torch.contiguous_format, torch.channels_last], ids=["nchw_out", "cl_out"])
@pytest.mark.parametrize("colour", [False, True], ids=["plain", "jitter_normalize"])
def test_uint8_images_match_the_float64_reference(device, channels, source, out_dtype, out_format, colour):
    """From bytes as decoded (NHWC tensor, NCHW tensor, list of HWC arrays) to a float batch: the
    float64 grid_sample of the same bytes / 255, then jitter and normalisation; masks exact."""
    if out_dtype == torch.float16 and device.name == "cpu" and source != "nhwc":
        pytest.skip("float16 output on CPU: one source is enough")
    hwc, mask = _bytes_batch(3, channels, 21, 26)
    theta = (
        RandomAffine(rotate=35, flip=0.5, scale=(0.7, 1.4), translate=0.1)
        .sample(3, (21, 26), torch.Generator().manual_seed(3))
        .theta
    )
    color = torch.tensor([[1.3, -0.1], [0.7, 0.2], [1.0, 0.0]], dtype=torch.float64) if colour else None
    mean, std = (MEAN[:channels], STD[:channels]) if colour else (None, None)
    if source == "list":
        image, layout = [hwc[i].numpy() for i in range(3)], "NCHW"  # lists are always HWC
    elif source == "nhwc":
        image, layout = hwc.to(device.device), "NHWC"
    else:
        image, layout = hwc.permute(0, 3, 1, 2).contiguous().to(device.device), "NCHW"
    masks = [mask[i].numpy() for i in range(3)] if source == "list" else mask.to(device.device)
    if source == "list" and device.name != "cpu":
        pytest.skip("lists are stacked on the CPU")
    ours, ours_mask = segfast.ops.affine_augment(
        image,
        masks,
        theta,
        (19, 30),
        color=None if color is None else color.to(device.device),
        mean=mean,
        std=std,
        out_dtype=out_dtype,
        out_memory_format=out_format,
        image_layout=layout,
    )
    ours, ours_mask = ours.cpu(), ours_mask.cpu()
    assert ours.dtype == out_dtype and ours.is_contiguous(memory_format=out_format)
    nchw = hwc.permute(0, 3, 1, 2)
    reference = _colour_reference(_stock(nchw.double() / 255, theta, (19, 30)), color, mean, std)
    stock = _colour_reference(_stock(nchw.float() / 255, theta, (19, 30)), color, mean, std).to(out_dtype)
    assert_close_to_reference(
        ours, stock if out_dtype != torch.float64 else reference.to(torch.float64), reference, "image"
    )
    if out_dtype in (torch.float32, torch.float64):  # the accuracy the docstring states
        bound = (1e-6 if out_dtype == torch.float32 else 1e-12) * max(1.0, reference.abs().max().item())
        assert (ours.double() - reference).abs().max().item() <= bound
    assert torch.equal(ours_mask, _reference_mask(mask, theta, (19, 30), 255))


def test_uint8_words_stay_inside_the_image():
    """The interleaved-bytes path reads 4 bytes per pixel: the last pixel of a 3-channel image, at
    the very end of its storage, and a 1-pixel image (3 bytes in all) read nothing past the end."""
    for h, w in [(1, 1), (1, 2), (5, 7)]:
        storage = torch.randint(0, 256, (2 * h * w * 3,), dtype=torch.uint8)
        hwc = storage.view(2, h, w, 3)  # the tensor ends where its storage ends
        theta = torch.eye(2, 3, dtype=torch.float64).expand(2, 2, 3).clone()
        ours, _ = segfast.ops.affine_augment(hwc, torch.zeros(2, h, w, dtype=torch.uint8), theta, image_layout="NHWC")
        assert torch.allclose(ours.double(), hwc.permute(0, 3, 1, 2).double() / 255, atol=1e-6)


def test_random_affine_jitter_and_collate_of_decoded_images():
    import numpy as np

    hwc, mask = _bytes_batch(4, 3, 24, 20)
    transform = RandomAffine(
        rotate=20,
        flip=0.5,
        crop=16,
        brightness=0.2,
        contrast=0.3,
        mean=MEAN[:3],
        std=STD[:3],
        out_memory_format=torch.contiguous_format,
    )
    images, masks, params = transform(hwc, mask, torch.Generator().manual_seed(1), image_layout="NHWC")
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32 and images.is_contiguous()
    assert params.color.shape == (4, 2)
    assert ((params.color[:, 0] - 1).abs() <= 0.3).all() and (params.color[:, 1].abs() <= 0.2).all()
    reference = _colour_reference(
        _stock(hwc.permute(0, 3, 1, 2).double() / 255, params.theta, (16, 16)), params.color, MEAN, STD
    )
    assert (images.double() - reference).abs().max() <= 1e-5
    collate = AugmentCollate(transform, torch.Generator().manual_seed(1), image_layout="NHWC")
    batch = [(hwc[i].numpy(), mask[i].numpy().astype(np.uint8)) for i in range(4)]
    collated, collated_masks = collate(batch)
    assert torch.equal(collated, images) and collated_masks.dtype == torch.uint8
    assert torch.equal(collated_masks.long(), masks)


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


def _bytes_call(op=None, *args, image_dtype=torch.uint8, **options):
    """op (segfast.ops.affine_augment by default) on a 1 x 3 x 4 x 4 image of image_dtype."""
    op = op or segfast.ops.affine_augment
    image, mask = torch.zeros(1, 3, 4, 4, dtype=image_dtype), torch.zeros(1, 4, 4, dtype=torch.uint8)
    return op(image, mask, torch.zeros(1, 2, 3), *args, **options)


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
        (lambda: _bytes_call(std=[1, 0, 1]), ValueError, "std must be nonzero"),
        (lambda: _bytes_call(mean=[0.5, 0.5]), ValueError, "mean must be 3 finite numbers"),
        (lambda: _bytes_call(color=torch.ones(2, 2)), ValueError, r"color must be a floating \(N, 2\) = \(1, 2\)"),
        (lambda: _bytes_call(out_dtype=torch.int32), TypeError, "out_dtype must be one of"),
        (lambda: _bytes_call(image_dtype=torch.int16), TypeError, "image dtype must be one of"),
        (lambda: _bytes_call(image_layout="HWC"), ValueError, "image_layout must be one of NCHW, NHWC"),
        (
            lambda: _bytes_call(torch.ops.segfast.affine_augment, 4, 4, 255, None, torch.ones(2, 2)),
            ValueError,
            r"normalize must be a floating \(2, C\) = \(2, 3\)",
        ),
        (
            lambda: _bytes_call(torch.ops.segfast.affine_augment, 4, 4, 255, out_memory_format=torch.channels_last_3d),
            ValueError,
            "out_memory_format must be",
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
    hwc = (image * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2).to(device.device)
    color = torch.tensor([[1.2, 0.1], [0.9, -0.1]], device=device.device)
    normalize = torch.tensor([[0.4, 0.5], [0.2, 0.3]], dtype=torch.float64, device=device.device)
    for options in [(color, normalize, torch.bfloat16, torch.contiguous_format), (None, None, None, None)]:
        torch.library.opcheck(torch.ops.segfast.affine_augment.default, (hwc, *on_device[1:], 5, 4, 255, *options))
    if device.name != "cpu":
        return  # compile: the graph calls the same op
    compiled = torch.compile(lambda x, m, t: segfast.ops.affine_augment(x, m, t, (5, 4)), fullgraph=True)
    out, out_mask = compiled(image.float(), mask, theta)
    ref, ref_mask = segfast.ops.affine_augment(image.float(), mask, theta, (5, 4))
    assert torch.equal(out, ref) and torch.equal(out_mask, ref_mask)
    compiled = torch.compile(
        lambda x, m, t: segfast.ops.affine_augment(x, m, t, (5, 4), mean=0.5, std=0.25, image_layout="NHWC"),
        fullgraph=True,
    )
    hwc = (image * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    out, _ = compiled(hwc, mask, theta)
    ref, _ = segfast.ops.affine_augment(hwc, mask, theta, (5, 4), mean=0.5, std=0.25, image_layout="NHWC")
    assert out.dtype == torch.float32 and torch.equal(out, ref)


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


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=dtype_id)
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_twin_affine_augment_from_bytes(accelerator, out_dtype, layout):
    hwc, mask = _bytes_batch(3, 3, 40, 44)
    image = hwc.permute(0, 3, 1, 2)
    image = image.contiguous() if layout == "nchw" else image
    theta = (
        RandomAffine(rotate=30, flip=0.5, scale=(0.8, 1.2)).sample(3, (40, 44), torch.Generator().manual_seed(4)).theta
    )
    color = torch.tensor([[1.3, -0.1], [0.7, 0.2], [1.0, 0.0]])
    normalize = torch.tensor([MEAN[:3], STD[:3]], dtype=torch.float64)
    for options in [
        (color, normalize, out_dtype, torch.contiguous_format),
        (None, None, out_dtype, torch.channels_last),
    ]:
        results = accelerator.both("affine_augment", image, mask, theta, 35, 38, 255, *options)
        assert_same_as_twin(*results, "image, mask")
