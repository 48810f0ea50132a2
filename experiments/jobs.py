"""What every job does with the errors it knows: one line, exit status 1.

Bad data, a run that cannot be resumed, a training run that blew up, a
checkpoint or export that could not be written: each of these errors
already says what went wrong and what to do, so a job prints that sentence
(`error: ...`) instead of a traceback. Anything else is a bug and keeps its
traceback.
"""

import dataclasses
import functools
import importlib
import re
import sys

from absl import app, flags, logging

_DEFINE = {"int": flags.DEFINE_integer, "float": flags.DEFINE_float,
           "bool": flags.DEFINE_bool, "str": flags.DEFINE_string,
           "str | None": flags.DEFINE_string, "tuple[float, ...]": flags.DEFINE_list}
_PARSE = {"tuple[float, ...]": lambda values: tuple(float(v) for v in values)}


def flag_fields(config_cls) -> list:
    """The fields of a config that are flags (not nested configs)."""
    return [f for f in dataclasses.fields(config_cls) if not f.metadata.get("config")]


def define_flags(config_cls) -> None:
    """One absl flag per field of a config dataclass: its name, type,
    default, help and allowed values (the field's metadata) -- the dataclass
    is the one source of every default. A name another config defined
    already (the pipeline's and pretraining's `seed`) is shared, and must
    have the same default."""
    for field in flag_fields(config_cls):
        required = field.metadata.get("required", False)
        default = None if required else field.default
        if field.name in flags.FLAGS:
            shared = flags.FLAGS[field.name].default
            if shared != default:
                raise ValueError(f"--{field.name} is defined twice with different defaults: "
                                 f"{shared!r} and {default!r} ({config_cls.__name__})")
            continue
        kind = str(field.type)
        choices = field.metadata.get("choices", ())
        help_text = field.metadata["help"] + (" (required)" if required else "")
        if choices and kind == "str":
            flags.DEFINE_enum(field.name, default, list(choices), help_text)
            continue
        if choices:
            help_text += " One of " + ", ".join(str(c) for c in choices) + "."
        if kind.startswith("tuple"):
            default = [str(v) for v in default]
        _DEFINE[kind](field.name, default, help_text)


def config_from_flags(config_cls, argv=None, **given):
    """The config the parsed flags describe, with `given` values for the
    fields not taken from flags (nested configs, or a default that depends
    on another flag); usage errors name the flag."""
    if argv is not None and len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    values = {field.name: _PARSE.get(str(field.type), lambda v: v)(flags.FLAGS[field.name].value)
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


def known_errors() -> tuple[type, ...]:
    """The library's errors a user can cause and fix."""
    from contrastive_tf.config import OutputDirError
    from contrastive_tf.data import DataError
    from contrastive_tf.export import ExportError
    from contrastive_tf.finetune import ModelSourceError
    from contrastive_tf.training import CheckpointWriteError, NonFiniteLossError, ResumeError
    return (DataError, ResumeError, NonFiniteLossError, CheckpointWriteError, ExportError,
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
            if isinstance(error, known_errors()):
                print(f"error: {as_flags(str(error))}", file=sys.stderr, flush=True)
                sys.exit(1)
            raise
    return wrapper


def quiet_absl_show_progress() -> None:
    """absl's own logging down to warnings; the library's progress lines
    (`[stage] message`) on stdout."""
    logging.set_verbosity(logging.WARNING)
    from contrastive_tf import progress
    progress.show(rewrite=as_flags)


def job_main(config_cls, run: str):
    """The absl `main` of a job: the config from the flags, then
    `run(config)` ("module:function", imported once the flags are valid)."""
    @reports_known_errors
    def main(argv):
        config = config_from_flags(config_cls, argv)
        quiet_absl_show_progress()
        module, function = run.split(":")
        getattr(importlib.import_module(module), function)(config)
    return main
