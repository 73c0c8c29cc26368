"""Mode-correct `torch.fx` tracing of float models.

`torch.fx.symbolic_trace` records `self.training` as the constant it held at trace time: a model traced in train
mode would keep dropping paths (functional dropout, stochastic depth) after `.eval()`, and one traced in eval mode
would never drop them. `trace_model` traces the model in both modes and compares the two graphs:

- where they differ only in constant arguments (`F.dropout(x, p, self.training)`, `dropout_p=p if self.training
  else 0.0`), the argument becomes `by_mode(module, train_value, eval_value)`, read from the module the code
  belongs to at every call;
- where they differ in structure (`if self.training: ...`), or where a module cannot be traced at all, the
  innermost module concerned is kept whole (a leaf of the graph, called as it is, so it follows its own mode) and
  the model is traced again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

_MAX_RETRACES = 64


class ModeFlag(nn.Module):
    """A module without state whose only use is its `training` flag (the mode of the model it belongs to)."""


def by_mode(module: nn.Module, train_value: Any, eval_value: Any) -> Any:
    """`train_value` while `module` is in train mode, else `eval_value`."""
    return train_value if module.training else eval_value


class _Tracer(fx.Tracer):
    """A tracer that keeps the given modules (by qualified name) whole."""

    def __init__(self, leaves: set[str] | None = None):
        super().__init__()
        # Without arguments too: unpickling a traced model (torch.load of a whole model) builds its tracer class
        # with none, to re-trace the saved code.
        self.leaves = set() if leaves is None else leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.leaves or super().is_leaf_module(m, module_qualified_name)


class UntraceableError(Exception):
    """The model's own forward (not a submodule's) cannot be traced, or branches on the mode."""


def _innermost(stack: Any) -> str | None:
    """The qualified name of the innermost non-root module of a tracer's module stack (None at the root)."""
    names = [name for name, _ in (stack or {}).values() if name]
    return names[-1] if names else None


def _trace_once(model: nn.Module, leaves: set[str]) -> fx.Graph:
    """Trace `model` in its current mode, adding to `leaves` (and retrying) each submodule that cannot be traced."""
    for _ in range(_MAX_RETRACES):
        tracer = _Tracer(leaves)
        try:
            graph = tracer.trace(model)
        except Exception as exc:  # torch.fx raises many kinds; each means "this code cannot be traced"
            name = _innermost(tracer.module_stack)
            if name is None or name in leaves:
                raise UntraceableError(f"{type(exc).__name__}: {exc}".splitlines()[0]) from exc
            leaves.add(name)
            continue
        for node in graph.nodes:
            if isinstance(node.type, str):
                # A string annotation (`from __future__ import annotations` in the model's module) tells fx
                # nothing, and a GraphModule holding one cannot be pickled (torch.save of the whole model).
                node.type = None
        return graph
    raise UntraceableError(f"more than {_MAX_RETRACES} submodules cannot be traced")


def _same(
    a: Any, b: Any, path: tuple, constants: list[tuple[tuple, Any, Any]], renamed: dict[str, str] | None = None
) -> bool:
    """Whether two node arguments have the same structure; differing constants are appended to `constants`.

    `renamed` maps names of the second graph's nodes to the names of the equal nodes of the first.
    """
    renamed = renamed or {}
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.name == renamed.get(b.name, b.name)
    if isinstance(a, (tuple, list)) or isinstance(b, (tuple, list)):
        return (
            type(a) is type(b)
            and len(a) == len(b)
            and all(_same(x, y, (*path, i), constants, renamed) for i, (x, y) in enumerate(zip(a, b, strict=True)))
        )
    if isinstance(a, dict) or isinstance(b, dict):
        return (
            isinstance(a, dict) and isinstance(b, dict) and list(a) == list(b)
            and all(_same(a[k], b[k], (*path, k), constants, renamed) for k in a)
        )
    if isinstance(a, slice) or isinstance(b, slice):
        return isinstance(a, slice) and isinstance(b, slice) and all(
            _same(x, y, (*path, i), constants, renamed) for i, (x, y) in enumerate(
                zip((a.start, a.stop, a.step), (b.start, b.stop, b.step), strict=True)))
    if type(a) is type(b) and (a is b or a == b):
        return True
    if isinstance(a, (bool, int, float, str, type(None))) and isinstance(b, (bool, int, float, str, type(None))):
        constants.append((path, a, b))
        return True
    return False


def _same_constant(model: nn.Module, a: fx.Node, b: fx.Node) -> bool:
    """Whether two get_attr nodes read tensor constants of equal value (each trace stores its own copy under a new
    name, `_tensor_constant0`, `_tensor_constant1`, ...)."""
    if a.op != "get_attr" or b.op != "get_attr":
        return False
    x, y = getattr(model, a.target, None), getattr(model, b.target, None)
    return (
        a.target.startswith("_tensor_constant") and b.target.startswith("_tensor_constant")
        and isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype
        and x.shape == y.shape and bool(torch.equal(x, y))
    )


def _stack_names(node: fx.Node | None) -> list[str]:
    """The qualified names of the non-root modules whose forward produced `node`, outermost first."""
    stack = node.meta.get("nn_module_stack") if node is not None else None
    return [name for name, _ in (stack or {}).values() if name]


def _compare(
    model: nn.Module, train: fx.Graph, eval_: fx.Graph
) -> tuple[list[str] | None, list[tuple[fx.Node, tuple, Any, Any]]]:
    """How two traces of one model differ.

    Returns (None, constants) when they have the same structure, with (train-graph node, argument path, train
    value, eval value) for each constant that differs; else (modules, []) with the submodules that the first
    difference lies in, innermost first (empty when it lies in the model's own forward).
    """
    train_nodes, eval_nodes = list(train.nodes), list(eval_.nodes)
    differences = []
    renamed: dict[str, str] = {}  # eval-graph name -> train-graph name of equal tensor constants
    for index in range(max(len(train_nodes), len(eval_nodes))):
        a = train_nodes[index] if index < len(train_nodes) else None
        b = eval_nodes[index] if index < len(eval_nodes) else None
        if a is not None and b is not None and a.target != b.target and _same_constant(model, a, b):
            renamed[b.name] = a.name
            continue
        constants: list[tuple[tuple, Any, Any]] = []
        if (
            a is None or b is None or a.op != b.op or a.name != renamed.get(b.name, b.name) or a.target != b.target
            or not _same((a.args, a.kwargs), (b.args, b.kwargs), (), constants, renamed)
        ):
            names = dict.fromkeys([*reversed(_stack_names(a)), *reversed(_stack_names(b))])
            return sorted(names, key=lambda name: -name.count(".")), []
        differences.extend((a, path, x, y) for path, x, y in constants)
    return None, differences


def _replace_at(node: fx.Node, path: tuple, value: Any) -> None:
    """Set the argument of `node` at `path` ((0, i, ...) into args, (1, key, ...) into kwargs) to `value`."""

    def rebuild(container: Any, steps: tuple) -> Any:
        if not steps:
            return value
        head, rest = steps[0], steps[1:]
        if isinstance(container, dict):
            return {k: rebuild(v, rest) if k == head else v for k, v in container.items()}
        if isinstance(container, slice):
            parts = [container.start, container.stop, container.step]
            parts[head] = rebuild(parts[head], rest)
            return slice(*parts)
        items = [rebuild(v, rest) if i == head else v for i, v in enumerate(container)]
        return type(container)(items)

    args, kwargs = rebuild((node.args, node.kwargs), path)
    node.args, node.kwargs = tuple(args), dict(kwargs)


def _follow_mode(gm: fx.GraphModule, differences: list[tuple[fx.Node, tuple, Any, Any]]) -> None:
    """Make each mode-dependent constant of `gm`'s graph a `by_mode` read of the flag of the module it belongs to."""
    flags: dict[str, fx.Node] = {}
    for node, path, train_value, eval_value in differences:
        owner = _innermost(node.meta.get("nn_module_stack")) or "training_mode"
        try:
            gm.get_submodule(owner)
        except AttributeError:
            # A module traced through is not part of the GraphModule: a flag at its place follows its mode.
            gm.add_submodule(owner, ModeFlag())
        with gm.graph.inserting_before(node):
            if owner not in flags:
                flags[owner] = gm.graph.get_attr(owner)
            flag = gm.graph.call_function(by_mode, (flags[owner], train_value, eval_value))
        flag.meta["nn_module_stack"] = node.meta.get("nn_module_stack")
        _replace_at(node, path, flag)
    gm.graph.lint()
    gm.recompile()


def _keep_owners(gm: fx.GraphModule, model: nn.Module) -> None:
    """Give `gm` the original module of each parameter or buffer its graph reads directly (`self.qkv.weight`):
    `GraphModule` copies only the tensor into an empty `nn.Module`, and the quantizer needs to know the layer."""
    for node in gm.graph.nodes:
        if node.op != "get_attr" or "." not in node.target:
            continue
        owner = node.target.rpartition(".")[0]
        original = model.get_submodule(owner)
        # Only layers without submodules: a container would bring along submodules that the graph does not use.
        if type(gm.get_submodule(owner)) is nn.Module and type(original) is not nn.Module and not any(
                original.children()):
            parent, _, child = owner.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, child, original)


def trace_model(model: nn.Module) -> tuple[fx.GraphModule, list[str]]:
    """A `GraphModule` of `model` whose train / eval behaviour follows its mode, and the submodules kept whole.

    `model` is traced in both modes (its own mode is restored afterwards). Raises `UntraceableError` when the
    model's own forward cannot be traced or branches on `self.training`.
    """
    was_training = model.training
    leaves: set[str] = set()
    try:
        for _ in range(_MAX_RETRACES):
            model.train(True)
            train_graph = _trace_once(model, leaves)
            model.train(False)
            eval_graph = _trace_once(model, leaves)
            modules, differences = _compare(model, train_graph, eval_graph)
            if modules is None:
                break
            # The first submodule (innermost first) that is not kept whole yet: where the traces part, either it
            # branched on the mode, or its parent did (which the next round finds).
            default = fx.Tracer()
            candidates = [name for name in modules if name not in leaves
                          and not default.is_leaf_module(model.get_submodule(name), name)]
            if not candidates:
                raise UntraceableError(f"{type(model).__name__}.forward branches on self.training")
            leaves.add(candidates[0])
        else:
            raise UntraceableError(f"more than {_MAX_RETRACES} submodules branch on self.training")
    finally:
        model.train(was_training)
    gm = fx.GraphModule(model, train_graph, type(model).__name__)
    _keep_owners(gm, model)
    if differences:
        _follow_mode(gm, differences)
    return gm, sorted(leaves)
