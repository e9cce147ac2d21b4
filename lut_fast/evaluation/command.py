"""A typer command made from a settings dataclass: one option per field, plus ``--config``, ``--set``, ``--print-config``.

Used by ``lut-fast eval`` and ``lut-fast analyze``. A command is written as a function of the
resolved settings and of its own few parameters (checkpoints, ``--out``)::

    @settings_command(eval_app, "knn", KnnConfig)
    def knn(cfg: KnnConfig, ckpt: Path = typer.Argument(...), out: Optional[Path] = typer.Option(None)) -> None:
        ...

Every field of the dataclass becomes an option named after it (``batch_size`` -> ``--batch-size``;
a bool that defaults to off is a switch ``--use-ema``, one that defaults to on is ``--cache/--no-cache``),
with the field's comment as its help and its default shown; the option's own default is None
("not given"), so the dataclass stays the only home of each default. The settings are resolved by
``config.load_command_config``: defaults <- ``--config`` <- flags <- ``--set``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from lut_fast.evaluation.config import format_settings, load_command_config, option

CONFIG_HELP = "Settings file: YAML of this command's settings, or an earlier result JSON (its protocol.config)."
SET_HELP = "Override one setting: key=value (YAML value), repeatable; applied after the flags."
PRINT_HELP = "Print the resolved settings (and where each came from), then exit."
_CONTROL = ("config", "sets", "print_config")


def settings_command(app: typer.Typer, name: str, cls: type, *, label: str | None = None,
                     helps: dict[str, str] | None = None) -> Callable:
    """Register ``body(cfg, **own)`` as command ``name`` of ``app``, with an option for each field of ``cls``.

    ``label``: how ``--print-config`` and the provenance name the command (default ``app name``);
    ``helps``: help texts that replace a field's comment for this command.
    """

    def register(body: Callable) -> Callable:
        hints = typing.get_type_hints(body)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(body).parameters.values() if p.name != "cfg"]
        field_hints = typing.get_type_hints(cls)
        fields = [f for f in dataclasses.fields(cls) if f.metadata.get("recipe", True)]
        clash = {p.name for p in own} & ({f.name for f in fields} | set(_CONTROL))
        if clash:
            raise TypeError(f"{body.__name__}: parameters {sorted(clash)} clash with settings of {cls.__name__}")
        # A bool that defaults to on gets --x/--no-x; one that defaults to off a plain switch --x.
        switches = {f.name for f in fields if field_hints[f.name] is bool and f.default is True}
        params = list(own)
        for f in fields:
            dash = f.name.replace("_", "-")
            decl = f"--{dash}/--no-{dash}" if f.name in switches else f"--{dash}"
            params.append(inspect.Parameter(
                f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[field_hints[f.name]],
                default=option(cls, f.name, decl, help=(helps or {}).get(f.name)),
            ))
        params += [
            inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[Path],
                              default=typer.Option(None, "--config", help=CONFIG_HELP)),
            inspect.Parameter("sets", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[list[str]],
                              default=typer.Option(None, "--set", help=SET_HELP)),
            inspect.Parameter("print_config", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=bool,
                              default=typer.Option(False, "--print-config", help=PRINT_HELP)),
        ]
        command = label or f"{app.info.name or ''} {name}".strip()

        @functools.wraps(body)
        def run(**kwargs: Any) -> Any:
            mine = {p.name: kwargs.pop(p.name) for p in own}
            config, sets, print_config = (kwargs.pop(k) for k in _CONTROL)
            # Provenance names the flag as typed: --no-cache for an on/off switch turned off.
            names = {k: f"--{'' if v else 'no-'}{k.replace('_', '-')}" for k, v in kwargs.items() if k in switches}
            cfg = load_command_config(cls, config, kwargs, sets, names)
            if print_config:
                typer.echo(format_settings(cfg, command), nl=False)
                raise typer.Exit(0)
            return body(cfg, **mine)

        del run.__wrapped__  # typer reads the signature below, not the body's
        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in params}
        app.command(name)(run)
        return body

    return register
