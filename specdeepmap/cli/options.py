"""CLI options generated from a step's parameter model, so the two cannot drift apart.

``@step_options(ChipParams)`` adds one ``--option`` per field of the model to a typer command
(name, default, help text and inclusive bounds from the field) and hands the command one
validated ``params`` argument instead. A field's ``json_schema_extra={"cli": [...]}`` adds
older option names (``--train`` beside ``--train-percent``).
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

import annotated_types
import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo


def _option_type(annotation: Any) -> Any:
    """The type typer parses: string Literals stay choices, int Literals become ``int``."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        values = typing.get_args(annotation)
        return annotation if all(isinstance(v, str) for v in values) else type(values[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _option_type(args[0]) | None if len(args) == 1 else str
    return annotation


def _bounds(field: FieldInfo) -> dict[str, float]:
    """Inclusive bounds for click (exclusive ones are left to the model's validation)."""
    bounds: dict[str, float] = {}
    for rule in field.metadata:
        if isinstance(rule, annotated_types.Ge):
            bounds["min"] = rule.ge
        elif isinstance(rule, annotated_types.Le):
            bounds["max"] = rule.le
    return bounds


def option_parameter(name: str, field: FieldInfo) -> inspect.Parameter:
    """One keyword parameter of a typer command for one model field."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    names = [f"--{name.replace('_', '-')}", *extra.get("cli", [])]
    kind = _option_type(field.annotation)
    if kind is bool or kind == (bool | None):  # --flag/--no-flag, as typer writes it
        names = [f"{names[0]}/--no-{name.replace('_', '-')}", *names[1:]]
    default = field.get_default(call_default_factory=True)
    if isinstance(default, list):  # a repeatable option; not given: the model's default
        kind, default = kind | None, None
    option = typer.Option(*names, help=field.description, **_bounds(field))
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[kind, option],
    )


def step_options(
    model: type[BaseModel], *, exclude: tuple[str, ...] = (), argument: str = "params"
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a typer command one option per field of ``model``; it receives ``argument=model(...)``.

    Fields named in ``exclude`` keep their defaults (the command sets them itself).
    """
    fields = {name: field for name, field in model.model_fields.items() if name not in exclude}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        names = list(signature.parameters)
        at = names.index(argument)  # the step's options go where its argument was
        own = [
            p if i < at else p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for i, p in enumerate(signature.parameters.values())
            if p.name != argument
        ]
        clash = set(fields) & {p.name for p in own}
        if clash:
            raise TypeError(f"{command.__name__}: options {sorted(clash)} defined twice")

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            given = {name: kwargs.pop(name) for name in fields}
            # an option left out stands for the field's default (a repeatable one is None)
            values = {name: value for name, value in given.items() if value is not None}
            return command(**kwargs, **{argument: model(**values)})

        parameters = (
            own[:at] + [option_parameter(name, field) for name, field in fields.items()] + own[at:]
        )
        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        del wrapper.__wrapped__  # typer must see the new signature, not the command's
        return wrapper

    return decorate
