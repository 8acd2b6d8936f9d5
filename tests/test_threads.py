"""The ops from several Python threads at once give what they give serially, and pooling and
cross-entropy (and conv2d_act's direct kernel) are bitwise deterministic whatever the thread count."""

import contextlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import segfast
from segfast.bench.dispatch import DIRECT, FORCED, forcing


def _paths(name: str):
    """The direct convolution where the workload names it, whatever the dispatch table picks for its shape."""
    return forcing(FORCED[DIRECT]) if name.endswith("direct") else contextlib.nullcontext()


def _workloads():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 33, 31, generator=g)
    logits = torch.randn(4, 7, 20, 20, generator=g)
    target = torch.randint(0, 7, (4, 20, 20), generator=g)
    weight = torch.randn(6, 8, 3, 3, generator=g)
    rgb = torch.randn(2, 3, 24, 24, generator=g)
    w_rgb = torch.randn(8, 3, 3, 3, generator=g, requires_grad=True)

    def grads(fn, *inputs):
        inputs = [t.detach().requires_grad_() for t in inputs]
        out = fn(*inputs)
        return (out.detach(), *torch.autograd.grad(out.sum() if out.dim() else out, inputs))

    return {
        "max_pool2d": lambda: grads(lambda t: segfast.ops.max_pool2d(t, 3, 2, 1), x),
        "max_pool2d NHWC": lambda: grads(
            lambda t: segfast.ops.max_pool2d(t, 2), x.to(memory_format=torch.channels_last)
        ),
        "avg_pool2d": lambda: grads(lambda t: segfast.ops.avg_pool2d(t, 3, 2, 1, True, False), x),
        "cross_entropy": lambda: grads(lambda t: segfast.ops.cross_entropy(t, target, label_smoothing=0.1), logits),
        "conv2d_act": lambda: grads(lambda t, w: segfast.ops.conv2d_act(t, w, padding=1, activation="silu"), x, weight),
        "conv2d_act direct": lambda: grads(lambda w: segfast.ops.conv2d_act(rgb, w, padding=1), w_rgb),
    }


WORKLOADS = list(_workloads())


@pytest.mark.parametrize("name", WORKLOADS)
def test_concurrent_calls_match_serial(name):
    work = _workloads()[name]
    with _paths(name), ThreadPoolExecutor(max_workers=4) as pool:
        serial = work()
        results = list(pool.map(lambda _: work(), range(16)))
    for result in results:
        for a, b in zip(result, serial):
            # oneDNN (the general conv path) may pick another blocking under load: tolerance there
            torch.testing.assert_close(
                a, b, rtol=0 if "conv" not in name else 1e-5, atol=0 if "conv" not in name else 1e-5
            )


@pytest.mark.parametrize("name", ["max_pool2d", "max_pool2d NHWC", "avg_pool2d", "cross_entropy", "conv2d_act direct"])
def test_bitwise_deterministic_across_thread_counts(name):
    work = _workloads()[name]
    threads = torch.get_num_threads()
    runs = []
    try:
        with _paths(name):
            for n in (1, 2, 1, 2):
                torch.set_num_threads(n)
                runs.append(work())
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(run, runs[0]))
