"""Finding a reward by name: a plain dict of built-ins, and ``package.module:function`` import paths."""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from .arithmetic import countdown
from .length import length_penalty
from .matching import exact_match, multiple_choice
from .numeric import math_answer, math_answer_partial
from .tags import format_tags

RewardFunc = Callable[..., list[float | None]]
"""TRL's reward signature: ``fn(prompts, completions, **kwargs) -> list[float | None]``."""

BUILTINS: dict[str, RewardFunc] = {
    "math_answer": math_answer,
    "math_answer_partial": math_answer_partial,
    "exact_match": exact_match,
    "multiple_choice": multiple_choice,
    "format_tags": format_tags(),  # factories are listed with their default settings
    "length_penalty": length_penalty(),
    "countdown": countdown,
}


def available() -> list[str]:
    """The names of the built-in rewards, sorted."""
    return sorted(BUILTINS)


def get(name: str) -> RewardFunc:
    """The built-in reward called ``name`` (a factory's name gives it with its default settings).

    Raises:
        ValueError: an unknown name; the message lists the available names.
    """
    if isinstance(name, str) and name in BUILTINS:
        return BUILTINS[name]
    close = difflib.get_close_matches(name, BUILTINS, n=1) if isinstance(name, str) else []
    raise ValueError(
        f"unknown reward {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}; built-in rewards: "
        f"{', '.join(available())}; a custom reward is named by its import path, 'package.module:function'"
    )


def resolve(spec: str | RewardFunc) -> RewardFunc:
    """A reward from a config entry: a built-in name (``"math_answer"``), an import path
    (``"my_rewards:brevity"``, ``"pkg.rewards:Scorers.strict"``; TRL's dotted ``"my_rewards.brevity"`` also works),
    or a callable, returned as is.

    A module that is not importable from ``sys.path`` is looked for in the current directory too, as TRL's ``grpo``
    script does, so ``my_rewards.py`` next to the YAML config works when you run from that directory. The object
    found must be callable and accept ``**kwargs`` (TRL passes every dataset column and ``trainer_state``); a
    factory such as ``reward_fns:length_penalty`` is refused: name a configured instance instead.

    Raises:
        ValueError: an unknown built-in name (listing them), or an import path that does not resolve; the message
            says which part failed (the module, an attribute, or the object found).
    """
    if callable(spec):
        return _check_reward(spec, repr(spec))
    if not isinstance(spec, str):
        raise ValueError(f"a reward is a built-in name, 'package.module:function' or a callable, got {spec!r}")
    spec = spec.strip()
    if spec in BUILTINS:
        return BUILTINS[spec]
    if ":" not in spec and "." not in spec:
        return get(spec)
    module_name, _, attribute = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not _dotted_name(module_name) or not _dotted_name(attribute):
        raise ValueError(
            f"reward {spec!r}: expected 'package.module:function' (dotted Python names on both sides of one ':'), "
            f"or a built-in name: {', '.join(available())}"
        )
    obj: Any = _import(spec, module_name)
    for depth, part in enumerate(attribute.split(".")):
        owner = module_name if depth == 0 else f"{module_name}:{'.'.join(attribute.split('.')[:depth])}"
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = _public_callables(obj)
            raise ValueError(
                f"reward {spec!r}: {owner!r} was imported but has no attribute {part!r}"
                f"{f'; its public callables: {names}' if names else ''}"
            ) from None
        except Exception as exc:  # a lazy module __getattr__ or a property that fails
            raise ValueError(f"reward {spec!r}: getting {part!r} from {owner!r} failed: {exc!r}") from exc
    return _check_reward(obj, spec)


def _public_callables(obj: Any) -> list[str]:
    names = []
    for name in dir(obj):
        try:
            if not name.startswith("_") and callable(getattr(obj, name)):
                names.append(name)
        except Exception:  # a property that raises is simply not listed
            continue
    return names[:20]


def _dotted_name(name: str) -> bool:
    return bool(name) and all(part.isidentifier() for part in name.split("."))


def _import(spec: str, module_name: str) -> Any:
    for attempt in range(2):
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if not (module_name == missing or module_name.startswith(missing + ".")):
                raise ValueError(
                    f"reward {spec!r}: module {module_name!r} was found but importing it failed: {exc}"
                ) from exc
            cwd = os.getcwd()
            if attempt == 0 and cwd not in {os.path.abspath(p or ".") for p in sys.path}:
                sys.path.append(cwd)  # appended, so it never shadows an installed package
                importlib.invalidate_caches()
                continue
            what = f"module {module_name!r}" if missing == module_name else f"package {missing!r}"
            parent = f" ({missing.rpartition('.')[0]!r} was imported)" if "." in missing else ""
            raise ValueError(
                f"reward {spec!r}: cannot import {what}{parent}: no such module on sys.path or in the current "
                f"directory ({cwd})"
            ) from exc
        except Exception as exc:  # the module exists but raised while importing: surface its own error
            raise ValueError(
                f"reward {spec!r}: module {module_name!r} was found but importing it failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    raise AssertionError("unreachable")


def _check_reward(obj: Any, spec: str) -> RewardFunc:
    if not callable(obj):
        raise ValueError(f"reward {spec!r} is an object of type {type(obj).__name__}, not a callable reward function")
    try:
        parameters = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: let TRL call it
        return obj
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        names = ", ".join(p.name for p in parameters)
        raise ValueError(
            f"reward {spec!r} has the signature ({names}), but TRL calls rewards as fn(prompts=..., "
            f"completions=..., **dataset_columns, trainer_state=...): it must accept **kwargs. If it is a factory "
            f"(like reward_fns.length_penalty), call it in your module, e.g. `brevity = length_penalty(target=100)`, "
            f"and name that instead."
        )
    return obj
