"""Swap segfast's layers into an existing model: ``segfast.convert(model)``.

What is converted, each only where the result computes exactly what the original did:

- ``Conv2d`` / ``Linear`` followed by an activation (``ReLU``, ``LeakyReLU``, ``SiLU``,
  ``GELU(approximate="none")``, ``Sigmoid``, or their functional forms) becomes ``Conv2dAct`` /
  ``LinearAct``. In an ``nn.Sequential`` the activation's slot becomes ``nn.Identity`` so every
  name and state_dict key stays; elsewhere the model is traced with ``torch.fx`` and the pair is
  fused in the graph (the result is then a ``torch.fx.GraphModule`` with the same parameter names).
  A convolution or linear layer whose output has another user than the activation is kept.
- ``MaxPool2d``, ``AvgPool2d`` and ``CrossEntropyLoss`` become segfast's (same arguments).

The report says what was converted and, for every Conv2d/Linear that was not, why.
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from segfast import nn as snn

__all__ = ["ConversionReport", "convert"]


@dataclass
class ConversionReport:
    """``converted``: "name: what it became"; ``kept``: "name: why it was left as it was"."""

    converted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    traced: bool = False  # whether the torch.fx pass ran (and the result is a GraphModule)
    # layer name -> "what follows it": a BatchNorm between a layer and its activation keeps it unfused
    _followed_by: dict[str, str] = field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        lines = [
            f"segfast.convert: {len(self.converted)} converted, {len(self.kept)} kept"
            + (" (torch.fx graph)" if self.traced else "")
        ]
        lines += [f"  converted {entry}" for entry in self.converted]
        lines += [f"  kept      {entry}" for entry in self.kept]
        return "\n".join(lines)


def _activation_of_module(m: nn.Module) -> tuple[str, float] | None:
    """(segfast activation name, negative_slope) for an activation module segfast fuses exactly."""
    if isinstance(m, nn.ReLU):
        return "relu", 0.01
    if isinstance(m, nn.LeakyReLU):
        return "leaky_relu", float(m.negative_slope)
    if isinstance(m, nn.SiLU):
        return "silu", 0.01
    if isinstance(m, nn.GELU) and m.approximate == "none":
        return "gelu", 0.01
    if isinstance(m, nn.Sigmoid):
        return "sigmoid", 0.01
    return None


_FUNCTIONAL_ACTIVATIONS = {
    F.relu: "relu",
    torch.relu: "relu",
    F.silu: "silu",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    F.gelu: "gelu",
    F.leaky_relu: "leaky_relu",
}
_METHOD_ACTIVATIONS = {"relu": "relu", "sigmoid": "sigmoid"}


def _activation_of_node(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, float] | None:
    """The activation a traced node applies to its single input, if segfast fuses it exactly."""
    if node.op == "call_module":
        return _activation_of_module(modules[node.target])
    if node.op == "call_function" and node.target in _FUNCTIONAL_ACTIVATIONS:
        name = _FUNCTIONAL_ACTIVATIONS[node.target]
        args, kwargs = node.args[1:], dict(node.kwargs)
        if name == "leaky_relu":
            slope = args[0] if args else kwargs.pop("negative_slope", 0.01)
            kwargs.pop("inplace", None)
            return (name, float(slope)) if not kwargs and len(args) <= 2 and isinstance(slope, (int, float)) else None
        if name == "gelu":
            return (name, 0.01) if not args and kwargs.get("approximate", "none") == "none" else None
        kwargs.pop("inplace", None)
        return (name, 0.01) if not args[1:] and not kwargs else None
    if node.op == "call_method" and node.target in _METHOD_ACTIVATIONS and len(node.args) == 1 and not node.kwargs:
        return _METHOD_ACTIVATIONS[node.target], 0.01
    return None


def _fusable(layer: nn.Module) -> str | None:
    """None if ``layer`` (Conv2d or Linear) can become a fused segfast layer, else why not."""
    if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r} (segfast supports 'zeros')"
    return None


def _fused(layer: nn.Module, activation: str, negative_slope: float) -> nn.Module:
    """A Conv2dAct / LinearAct with ``layer``'s configuration, parameters and device/dtype."""
    p = layer.weight
    options = dict(device=p.device, dtype=p.dtype, activation=activation, negative_slope=negative_slope)
    has_bias = layer.bias is not None
    if isinstance(layer, nn.Conv2d):
        window = (layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.groups)
        fused = snn.Conv2dAct(layer.in_channels, layer.out_channels, *window, has_bias, **options)
    else:
        fused = snn.LinearAct(layer.in_features, layer.out_features, has_bias, **options)
    fused.load_state_dict(layer.state_dict())
    fused.train(layer.training)
    return fused


def _describe(layer: nn.Module) -> str:
    return type(layer).__name__


# stock layer -> segfast's subclass of it: the same constructor and state, segfast's forward
_SEGFAST_SUBCLASS = {
    nn.MaxPool2d: snn.MaxPool2d,
    nn.AvgPool2d: snn.AvgPool2d,
    nn.CrossEntropyLoss: snn.CrossEntropyLoss,
}


def _rebuilt_as(child: nn.Module, new_type: type) -> nn.Module:
    """``new_type`` built with the constructor arguments ``child`` keeps as attributes of the same names."""
    parameters = inspect.signature(type(child).__init__).parameters
    return new_type(**{name: getattr(child, name) for name in parameters if name != "self" and hasattr(child, name)})


def _swap_simple_layers(model: nn.Module, report: ConversionReport) -> None:
    """MaxPool2d, AvgPool2d, CrossEntropyLoss -> segfast's, wherever they sit."""
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            qualified = f"{parent_name}.{name}" if parent_name else name
            new_type = _SEGFAST_SUBCLASS.get(type(child))
            new = _rebuilt_as(child, new_type) if new_type is not None else None
            if new is not None:
                new.train(child.training)
                setattr(parent, name, new)
                report.converted.append(f"{qualified}: {_describe(child)} -> segfast.nn.{type(new).__name__}")


def _batch_norm_act(bn: nn.BatchNorm2d, activation: str, negative_slope: float) -> snn.BatchNormAct2d:
    """``bn`` and the activation after it as one BatchNormAct2d with bn's state (same keys)."""
    w = bn.running_mean if bn.running_mean is not None else bn.weight
    fused = snn.BatchNormAct2d(
        bn.num_features,
        bn.eps,
        bn.momentum,
        bn.affine,
        bn.track_running_stats,
        device=w.device if w is not None else None,
        dtype=w.dtype if w is not None else None,
        activation=activation,
        negative_slope=negative_slope,
    )
    fused.load_state_dict(bn.state_dict())
    return fused.train(bn.training)


def _fuse_in_sequentials(model: nn.Module, report: ConversionReport) -> None:
    for parent_name, parent in list(model.named_modules()):
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            layer, act = parent._modules[first], parent._modules[second]
            if type(layer) is nn.BatchNorm2d and _activation_of_module(act) is not None:
                qualified = f"{parent_name}.{first}" if parent_name else first
                parent._modules[first] = _batch_norm_act(layer, *_activation_of_module(act))
                parent._modules[second] = nn.Identity()
                report.converted.append(
                    f"{qualified}: BatchNorm2d + {_describe(act)} -> segfast.nn.BatchNormAct2d"
                    f"({_activation_of_module(act)[0]!r})"
                )
                continue
            if type(layer) not in (nn.Conv2d, nn.Linear):
                continue
            activation = _activation_of_module(act)
            qualified = f"{parent_name}.{first}" if parent_name else first
            if isinstance(act, nn.modules.batchnorm._BatchNorm):
                report._followed_by[qualified] = (
                    f"{_describe(act)} ({parent_name + '.' if parent_name else ''}{second})"
                )
            if activation is None or _fusable(layer) is not None:
                continue  # the fx pass (or the final sweep) reports it
            parent._modules[first] = _fused(layer, *activation)
            parent._modules[second] = nn.Identity()
            report.converted.append(
                f"{qualified}: {_describe(layer)} + {_describe(act)} -> "
                f"segfast.nn.{type(parent._modules[first]).__name__}({activation[0]!r})"
            )


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with segfast's layers as leaves too (their argument checks cannot run on
    proxies), as torch.nn's are."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return type(m).__module__ == snn.__name__ or super().is_leaf_module(m, qualified_name)


_GRAPH_FUSED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)


def _fuse_in_graph(model: nn.Module, report: ConversionReport, prefix: str = "") -> nn.Module:
    """The fx pass: fuses Conv2d/Linear -> activation pairs outside nn.Sequential, and BatchNorm2d ->
    [+ residual] -> activation. A module fx cannot trace (data-dependent control flow, smp's FPN) has
    its children traced one by one, recursively: the parts that trace are converted. ``prefix``: the
    module's qualified name in the converted model (for the report)."""
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception as e:  # noqa: BLE001  (any tracing failure means: no graph pass)
        report.kept.append(
            f"{prefix or '(whole model)'}: not traceable by torch.fx ({type(e).__name__}: {str(e)[:120]}); "
            "its submodules were traced one by one"
        )
        for name, child in list(model.named_children()):
            if any(type(m) in _GRAPH_FUSED for m in child.modules()):
                converted = _fuse_in_graph(child, report, f"{prefix}{name}.")
                if converted is not child:
                    setattr(model, name, _keeping_interface(converted, child))
        return model
    modules = dict(gm.named_modules())
    calls = Counter(node.target for node in gm.graph.nodes if node.op == "call_module")
    fused_any = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules[node.target]) not in (nn.Conv2d, nn.Linear):
            continue
        users = list(node.users)
        follower = modules.get(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
        if isinstance(follower, nn.modules.batchnorm._BatchNorm):
            report._followed_by[prefix + node.target] = f"{_describe(follower)} ({prefix}{users[0].target})"
        activation = _activation_of_node(users[0], modules) if len(users) == 1 else None
        # a layer called from several places keeps its class: the activation follows only one call
        if activation is None or calls[node.target] != 1 or _fusable(modules[node.target]) is not None:
            continue
        layer, act_node = modules[node.target], users[0]
        act_name = _describe(modules[act_node.target]) if act_node.op == "call_module" else str(act_node.target)
        fused = _fused(layer, *activation)
        parent_name, _, attr = node.target.rpartition(".")
        setattr(gm.get_submodule(parent_name) if parent_name else gm, attr, fused)
        act_node.replace_all_uses_with(node)
        gm.graph.erase_node(act_node)
        fused_any = True
        report.converted.append(
            f"{prefix}{node.target}: {_describe(layer)} + {act_name} -> "
            f"segfast.nn.{type(fused).__name__}({activation[0]!r}) [fx]"
        )
    fused_any |= _fuse_batch_norms_in_graph(gm, modules, calls, report, prefix)
    if not fused_any:
        return model
    gm.graph.lint()
    gm.recompile()
    report.traced = True
    return gm


def _keeping_interface(gm: fx.GraphModule, original: nn.Module) -> fx.GraphModule:
    """gm, traced from a submodule, made to answer as the original did: its class takes the
    original class's methods and properties (all but forward and __init__) and gm the original's
    plain attributes, since the parent, which fx could not trace, may use them (smp's FPN reads
    its encoder's output_stride). forward is gm's; a deep copy keeps all of it."""
    # a subclass of GraphModule itself, not of gm's per-instance class (fx derives a new one from
    # this class for each copy; deriving from gm's would chain two generated __call__s into a loop)
    namespace = {"__deepcopy__": _deepcopy_keeping_attributes, "forward": type(gm).forward}
    for cls in reversed(type(original).__mro__):
        if cls in nn.Module.__mro__:
            continue
        for key, value in vars(cls).items():
            if key not in ("forward", "__init__") and not (key.startswith("__") and key.endswith("__")):
                namespace[key] = value
    gm.__class__ = type(type(original).__name__, (fx.GraphModule,), namespace)
    for key, value in vars(original).items():
        gm.__dict__.setdefault(key, value)
    return gm


def _deepcopy_keeping_attributes(self: fx.GraphModule, memo: dict) -> fx.GraphModule:
    """GraphModule's deep copy rebuilds the module from its graph; the original's attributes are
    copied over too."""
    copied = fx.GraphModule.__deepcopy__(self, memo)
    for key, value in self.__dict__.items():
        if key not in copied.__dict__:
            copied.__dict__[key] = copy.deepcopy(value, memo)
    return copied


_ADDS = (operator.add, operator.iadd, torch.add)


def _added_to(node: fx.Node, add: fx.Node) -> fx.Node | None:
    """The other operand when ``add`` is a plain two-tensor sum with ``node`` as one operand."""
    plain = (add.op == "call_function" and add.target in _ADDS) or (add.op == "call_method" and add.target == "add")
    if not plain or add.kwargs or len(add.args) != 2:
        return None
    other = add.args[1] if add.args[0] is node else add.args[0] if add.args[1] is node else None
    return other if isinstance(other, fx.Node) else None


def _fuse_batch_norms_in_graph(
    gm: fx.GraphModule, modules: dict, calls: Counter, report: ConversionReport, prefix: str = ""
) -> bool:
    """BatchNorm2d -> activation, and BatchNorm2d -> + residual -> activation (torchvision's BasicBlock
    and Bottleneck, smp's ResNet encoders), each into one BatchNormAct2d call."""
    fused_any = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or type(modules.get(node.target)) is not nn.BatchNorm2d:
            continue
        if calls[node.target] != 1 or len(node.users) != 1 or len(node.args) != 1 or node.kwargs:
            continue
        user = next(iter(node.users))
        residual = _added_to(node, user) if len(user.users) == 1 else None
        act_node = next(iter(user.users)) if residual is not None else user
        activation = _activation_of_node(act_node, modules)
        if activation is None or (residual is not None and len(act_node.args) < 1):
            continue
        bn = modules[node.target]
        parent_name, _, attr = node.target.rpartition(".")
        setattr(gm.get_submodule(parent_name) if parent_name else gm, attr, _batch_norm_act(bn, *activation))
        # the fused call goes after the activation's input is complete: the residual may be computed
        # after the BatchNorm in the traced order (torchvision's downsample)
        with gm.graph.inserting_after(act_node):
            args = (node.args[0],) if residual is None else (node.args[0], residual)
            fused = gm.graph.call_module(node.target, args)
        act_node.replace_all_uses_with(fused)
        for dead in (act_node, user, node) if residual is not None else (act_node, node):
            gm.graph.erase_node(dead)
        act_name = _describe(modules[act_node.target]) if act_node.op == "call_module" else str(act_node.target)
        report.converted.append(
            f"{prefix}{node.target}: BatchNorm2d{' + residual' if residual is not None else ''} + {act_name} -> "
            f"segfast.nn.BatchNormAct2d({activation[0]!r}) [fx]"
        )
        fused_any = True
    return fused_any


def _report_unfused(model: nn.Module, report: ConversionReport) -> None:
    for name, m in model.named_modules():
        if type(m) in (nn.Conv2d, nn.Linear):
            follower = report._followed_by.get(name)
            reason = _fusable(m) or (
                f"its output goes to {follower}: the convolution stays the vendor's and the BatchNorm is fused "
                "with the activation after it where there is one (segfast.fold_batchnorm folds the BatchNorm "
                "into the convolution for inference)"
                if follower
                else "no activation that segfast fuses exactly follows it as its only user"
            )
            report.kept.append(f"{name}: {_describe(m)}: {reason}")
        elif type(m) is nn.BatchNorm2d:
            report.kept.append(
                f"{name}: BatchNorm2d: no activation that segfast fuses follows it (directly, or after adding a "
                "residual) as its only user"
            )


def convert(model: nn.Module, inplace: bool = False, *, fx_trace: bool = True) -> tuple[nn.Module, ConversionReport]:
    """Returns ``(converted model, report)``; the converted model computes what ``model`` did.

    Args:
        model: any ``nn.Module``.
        inplace: modify ``model`` itself (its submodules are replaced) instead of a deep copy;
            a graph fusion still returns a new GraphModule (sharing the converted submodules).
        fx_trace: also fuse pairs outside ``nn.Sequential`` by tracing the model with
            ``torch.fx``; when that fuses something the result is a ``GraphModule`` with the same
            parameter names (state_dicts load both ways), else the model keeps its class.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be an nn.Module, got {type(model).__name__}")
    report = ConversionReport()
    model = model if inplace else copy.deepcopy(model)
    _fuse_in_sequentials(model, report)
    _swap_simple_layers(model, report)
    if fx_trace and any(type(m) in _GRAPH_FUSED for m in model.modules()):
        model = _fuse_in_graph(model, report)
    _report_unfused(model, report)
    return model, report
