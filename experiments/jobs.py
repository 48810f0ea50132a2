"""What every job does with the errors it knows: one line, exit status 1.

Bad data, a run that cannot be resumed, a training run that blew up, a
checkpoint or export that could not be written: each of these errors
already says what went wrong and what to do, so a job prints that sentence
(`error: ...`) instead of a traceback. Anything else is a bug and keeps its
traceback.
"""

import dataclasses
import functools
import re
import sys
import types
import typing

from absl import app, flags, logging

from contrastive_tf.data import DataError
from contrastive_tf.runs.artifacts import ModelSourceError, OutputDirError
from contrastive_tf.runs.checkpoints import CheckpointWriteError, NonFiniteLossError, ResumeError
from contrastive_tf.runtime import progress
from contrastive_tf.serving.export import ExportError

_DEFINE = {int: flags.DEFINE_integer, float: flags.DEFINE_float, bool: flags.DEFINE_bool,
           str: flags.DEFINE_string, tuple: flags.DEFINE_list}


def flag_type(config_cls, field):
    """(kind, element): the Python type a field's flag holds -- int, float,
    bool, str, or tuple with its element type -- from the field's
    annotation; `X | None` and `Optional[X]` are X. Any other annotation is
    an error naming the field."""
    hint = typing.get_type_hints(config_cls)[field.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = options[0] if len(options) == 1 else hint
    if typing.get_origin(hint) is tuple:
        element = typing.get_args(hint)[0]
        if element in (int, float, str):
            return tuple, element
    elif hint in _DEFINE:
        return hint, None
    raise TypeError(f"{config_cls.__name__}.{field.name}: no flag type for {hint!r}")


def flag_fields(config_cls) -> list:
    """The fields of a config that are flags (not nested configs)."""
    return [f for f in dataclasses.fields(config_cls) if not f.metadata.get("config")]


def define_flags(config_cls, shared: tuple[str, ...] = ()) -> None:
    """One absl flag per field of a config dataclass: its name, type,
    default, help and allowed values (the field's metadata) -- the dataclass
    is the one source of every default. A field named in `shared` takes the
    flag another config defined already (the pipeline passes ("seed",): one
    --seed seeds its stages and its pretraining), and must have the same
    default; any other name defined twice is an error."""
    for field in flag_fields(config_cls):
        required = field.metadata.get("required", False)
        default = None if required else field.default
        if field.name in flags.FLAGS:
            existing = flags.FLAGS[field.name].default
            if field.name not in shared or existing != default:
                raise ValueError(f"--{field.name} of {config_cls.__name__} is defined already "
                                 f"(default {existing!r}, here {default!r}); name it in "
                                 "`shared` to use one flag for both")
            continue
        kind, _ = flag_type(config_cls, field)
        choices = field.metadata.get("choices", ())
        help_text = field.metadata["help"] + (" (required)" if required else "")
        if choices and kind is str:
            flags.DEFINE_enum(field.name, default, list(choices), help_text)
            continue
        if choices:
            help_text += " One of " + ", ".join(str(c) for c in choices) + "."
        if kind is tuple:
            default = [str(v) for v in default]
        _DEFINE[kind](field.name, default, help_text)


def config_from_flags(config_cls, argv=None, **given):
    """The config the parsed flags describe, with `given` values for the
    fields not taken from flags (nested configs, or a default that depends
    on another flag); usage errors name the flag."""
    if argv is not None and len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = {field.name: _parse(config_cls, field, flags.FLAGS[field.name].value)
              for field in flag_fields(config_cls) if field.name not in given}
    values.update(given)
    missing = [f.name for f in flag_fields(config_cls)
               if f.metadata.get("required") and not values[f.name]]
    if missing:
        raise app.UsageError(", ".join(f"--{name}" for name in missing) + " required")
    try:
        return config_cls(**values)
    except ValueError as error:
        raise app.UsageError(str(error)) from None


def _parse(config_cls, field, value):
    """A flag's value as its config field holds it (list flags -> tuples)."""
    kind, element = flag_type(config_cls, field)
    return tuple(element(v) for v in value) if kind is tuple else value


# The library's errors a user can cause and fix.
KNOWN_ERRORS = (DataError, ResumeError, NonFiniteLossError, CheckpointWriteError, ExportError,
                ModelSourceError, OutputDirError)


def as_flags(text: str) -> str:
    """The library names an argument as `name`; a job says --name where the
    job has that flag."""
    return re.sub(r"`(\w+)`", lambda m: f"--{m.group(1)}" if m.group(1) in flags.FLAGS
                  else m.group(0), text)


def reports_known_errors(main):
    """Wraps an absl `main(argv)`: a known error exits with its message."""
    @functools.wraps(main)
    def wrapper(argv):
        try:
            return main(argv)
        except Exception as error:
            if isinstance(error, KNOWN_ERRORS):
                print(f"error: {as_flags(str(error))}", file=sys.stderr, flush=True)
                sys.exit(1)
            raise
    return wrapper


def quiet_absl_show_progress() -> None:
    """absl's own logging down to warnings; the library's progress lines
    (`[stage] message`) on stdout."""
    logging.set_verbosity(logging.WARNING)
    progress.show(rewrite=as_flags)


def job_main(config_cls, run):
    """The absl `main` of a job: the config from the flags, then
    `run(config)`."""
    @reports_known_errors
    def main(argv):
        config = config_from_flags(config_cls, argv)
        quiet_absl_show_progress()
        run(config)
    return main
