"""Source text that rebuilds a leaf module from its hyperparameters.

A generated stage constructs its layers (``nn.Conv2d(3, 16, kernel_size=(3, 3), ...)``) instead
of pickling them, so the file is readable and needs nothing but torch. The arguments come from
the constructor call recorded while the model was built (``record_init_args``) or, failing that,
from attributes named like the constructor's parameters. Every rebuilt module is checked against
the original (same repr, same state shapes) before it is written.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import math
import operator
import sys
import weakref
from types import FrameType
from typing import Any, Callable, Iterator

import torch
from torch import nn

from autopipe.errors import UserError
from autopipe.trace import CONTAINERS

_SKIPPED_PARAMETERS = frozenset({"device", "dtype"})


_recorded: "weakref.WeakKeyDictionary[nn.Module, tuple[list[Any], dict[str, Any]]]" = (
    weakref.WeakKeyDictionary()
)


@contextlib.contextmanager
def record_init_args() -> Iterator[None]:
    """Remember the constructor arguments of every nn.Module created inside the block.

    A profile hook reads the arguments of the first ``__init__`` call on each new module, which
    is its own class's constructor, before the body runs.
    """

    def hook(frame: FrameType, event: str, arg: Any) -> None:
        code = frame.f_code
        if event != "call" or code.co_name != "__init__" or code.co_argcount == 0:
            return
        module = frame.f_locals.get(code.co_varnames[0])
        if isinstance(module, nn.Module) and module not in _recorded:
            _recorded[module] = _arguments_of(frame)

    previous = sys.getprofile()
    sys.setprofile(hook)
    try:
        yield
    finally:
        if previous is None or callable(previous):
            sys.setprofile(previous)
        else:  # cProfile's profiler is no Python hook; it puts itself back
            previous.enable()


def _arguments_of(frame: FrameType) -> tuple[list[Any], dict[str, Any]]:
    code, values = frame.f_code, frame.f_locals
    named = code.co_varnames[1 : code.co_argcount + code.co_kwonlyargcount]
    position = code.co_argcount + code.co_kwonlyargcount
    var_args = code.co_varnames[position] if code.co_flags & inspect.CO_VARARGS else None
    position += bool(var_args)
    var_kwargs = code.co_varnames[position] if code.co_flags & inspect.CO_VARKEYWORDS else None
    if var_args:
        positional = [values[n] for n in named[: code.co_argcount - 1]] + list(values[var_args])
        kwargs = {n: values[n] for n in named[code.co_argcount - 1 :]}
    else:
        positional, kwargs = [], {n: values[n] for n in named}
    if var_kwargs:
        kwargs.update(values[var_kwargs])
    return positional, kwargs


class Imports:
    """The import lines a generated file needs, collected while writing it."""

    def __init__(self) -> None:
        self.lines: set[str] = set()

    def name_of_class(self, cls: type) -> str:
        if cls.__module__.startswith("torch.nn") and getattr(nn, cls.__name__, None) is cls:
            return f"nn.{cls.__name__}"
        if cls.__module__ == "builtins":
            return cls.__name__
        self.lines.add(f"from {cls.__module__} import {cls.__qualname__.split('.')[0]}")
        return cls.__qualname__

    def name_of_function(self, fn: Callable) -> str:
        name = getattr(fn, "__name__", None)
        if name is None:
            raise UserError(f"cannot name the function {fn!r} in generated code")
        if getattr(builtins, name, None) is fn:
            return name
        for alias, namespace in (
            ("F", nn.functional),
            ("torch", torch),
            ("operator", operator),
            ("math", math),
        ):
            if getattr(namespace, name, None) is fn:
                if alias in ("operator", "math"):
                    self.lines.add(f"import {alias}")
                return f"{alias}.{name}"
        module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", name)
        if module is None or "<" in qualname:
            raise UserError(
                f"cannot name the function {fn!r} in generated code: define it at module level"
            )
        self.lines.add(f"import {module}")
        return f"{module}.{qualname}"


def literal(
    value: Any, imports: Imports, name_of: Callable[[Any], str | None] = lambda v: None
) -> str:
    """Python source for a constant; ``name_of`` names values that are variables."""
    named = name_of(value)
    if named is not None:
        return named
    if value is None or isinstance(value, (bool, int, str)):
        return repr(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else f'float("{value}")'
    if value is Ellipsis:
        return "..."
    if isinstance(value, torch.Size):
        return f"torch.Size({literal(list(value), imports, name_of)})"
    if isinstance(value, tuple):
        items = [literal(v, imports, name_of) for v in value]
        return f"({items[0]},)" if len(items) == 1 else f"({', '.join(items)})"
    if isinstance(value, list):
        return f"[{', '.join(literal(v, imports, name_of) for v in value)}]"
    if isinstance(value, dict):
        body = ", ".join(
            f"{literal(k, imports, name_of)}: {literal(v, imports, name_of)}"
            for k, v in value.items()
        )
        return f"{{{body}}}"
    if isinstance(value, slice):
        parts = (literal(v, imports, name_of) for v in (value.start, value.stop, value.step))
        return f"slice({', '.join(parts)})"
    if isinstance(value, (torch.dtype, torch.memory_format, torch.layout)):
        return str(value)
    if isinstance(value, torch.device):
        return f'torch.device("{value}")'
    if isinstance(value, nn.Module):
        return constructor(value, imports)
    if inspect.isclass(value):
        return imports.name_of_class(value)
    if callable(value):
        return imports.name_of_function(value)
    raise UserError(
        f"cannot write the constant {value!r} ({type(value).__name__}) in generated code"
    )


def _arguments_from_attributes(module: nn.Module) -> tuple[list[Any], dict[str, Any]] | None:
    """Constructor arguments read back from same-named attributes, or None if some are missing."""
    try:
        parameters = inspect.signature(type(module).__init__).parameters
    except (TypeError, ValueError):
        return None
    kwargs: dict[str, Any] = {}
    for name, p in list(parameters.items())[1:]:
        if (
            p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            or name.startswith("_")
            or name in _SKIPPED_PARAMETERS
        ):
            continue
        if name == "bias" and isinstance(getattr(module, "bias", None), (torch.Tensor, type(None))):
            kwargs[name] = getattr(module, "bias", None) is not None
        elif name == "bias" and hasattr(module, "in_proj_bias"):
            kwargs[name] = module.in_proj_bias is not None
        elif name == "add_bias_kv" and hasattr(module, "bias_k"):
            kwargs[name] = module.bias_k is not None
        elif hasattr(module, name) and not isinstance(getattr(module, name), torch.Tensor):
            kwargs[name] = getattr(module, name)
        elif p.default is p.empty:
            return None
    return [], kwargs


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # values whose == is not a plain truth value are never defaults here
        return False


def _shorten(
    cls: type, args: list[Any], kwargs: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """Drop arguments equal to their defaults; pass leading required ones positionally."""
    try:
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return args, kwargs
    defaults = {p.name: p.default for p in parameters if p.default is not p.empty}
    kwargs = {k: v for k, v in kwargs.items() if not (k in defaults and _same(v, defaults[k]))}
    if not args:
        for p in parameters:
            if (
                p.kind is not p.POSITIONAL_OR_KEYWORD
                or p.default is not p.empty
                or p.name not in kwargs
            ):
                break
            args.append(kwargs.pop(p.name))
    return args, kwargs


def _call(cls: type, args: list[Any], kwargs: dict[str, Any], imports: Imports) -> str:
    args, kwargs = _shorten(cls, list(args), dict(kwargs))
    cls_name = imports.name_of_class(cls)
    parts = [literal(a, imports) for a in args]
    parts += [f"{k}={literal(v, imports)}" for k, v in kwargs.items()]
    return f"{cls_name}({', '.join(parts)})"


def _container(module: nn.Module, imports: Imports) -> str:
    children = list(module.named_children())
    if isinstance(module, nn.Sequential) and all(
        name == str(i) for i, (name, _) in enumerate(children)
    ):
        return f"nn.Sequential({', '.join(constructor(c, imports) for _, c in children)})"
    if isinstance(module, nn.ModuleList):
        return f"nn.ModuleList([{', '.join(constructor(c, imports) for _, c in children)}])"
    items = ", ".join(f"({name!r}, {constructor(c, imports)})" for name, c in children)
    if isinstance(module, nn.ModuleDict):
        return f"nn.ModuleDict({{{', '.join(f'{n!r}: {constructor(c, imports)}' for n, c in children)}}})"
    imports.lines.add("from collections import OrderedDict")
    return f"{imports.name_of_class(type(module))}(OrderedDict([{items}]))"


def constructor(module: nn.Module, imports: Imports) -> str:
    """Source that builds a module like ``module`` (fresh weights, same hyperparameters)."""
    cls = type(module)
    if isinstance(module, CONTAINERS) and not isinstance(
        module, (nn.ParameterList, nn.ParameterDict)
    ):
        return _container(module, imports)
    source = None
    for arguments in (_recorded.get(module), _arguments_from_attributes(module)):
        if arguments is None:
            continue
        args, kwargs = list(arguments[0]), {
            k: v for k, v in arguments[1].items() if k not in _SKIPPED_PARAMETERS
        }
        try:
            source = _call(cls, args, kwargs, imports)
            break
        except UserError:
            continue
    if source is None:
        raise UserError(
            f"cannot rebuild a {cls.__name__}: its constructor arguments were not recorded and are "
            "not attributes of the same name; build the model inside autopipe (a --task) or trace into it"
        )
    dtypes = {t.dtype for t in module.state_dict().values() if t.is_floating_point()}
    if len(dtypes) == 1 and (dtype := dtypes.pop()) != torch.get_default_dtype():
        source += f".to({dtype})"
    return source


def check_rebuilt(path: str, module: nn.Module, source: str, namespace: dict[str, Any]) -> None:
    """Build ``source`` on the meta device and compare it with the original module."""
    try:
        with torch.device("meta"):
            rebuilt = eval(
                source, namespace
            )  # noqa: S307 - source is generated here, from literals
    except Exception as error:
        raise UserError(
            f"rebuilding {path} ({type(module).__name__}) from {source[:80]} failed: {error}"
        ) from error
    expected = {k: (tuple(t.shape), t.dtype) for k, t in module.state_dict().items()}
    found = {k: (tuple(t.shape), t.dtype) for k, t in rebuilt.state_dict().items()}
    if expected != found or repr(rebuilt) != repr(module):
        raise UserError(
            f"cannot rebuild {path} ({type(module).__name__}) from its constructor arguments "
            "(the rebuilt module differs); build the model inside autopipe (a --task) or trace into it"
        )
