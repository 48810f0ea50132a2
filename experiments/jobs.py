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
import sys

from absl import app, flags, logging

_DEFINE = {"int": flags.DEFINE_integer, "float": flags.DEFINE_float,
           "bool": flags.DEFINE_bool, "str": flags.DEFINE_string,
           "str | None": flags.DEFINE_string}


def define_flags(config_cls) -> None:
    """One absl flag per field of a config dataclass: its name, type,
    default and help (the field's metadata) -- the dataclass is the one
    source of every default."""
    for field in dataclasses.fields(config_cls):
        required = field.metadata.get("required", False)
        default = None if required else field.default
        help_text = field.metadata["help"] + (" (required)" if required else "")
        _DEFINE[str(field.type)](field.name, default, help_text)


def config_from_flags(config_cls, argv):
    """The config the parsed flags describe; usage errors name the flag."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    fields = dataclasses.fields(config_cls)
    values = {field.name: flags.FLAGS[field.name].value for field in fields}
    missing = [f.name for f in fields if f.metadata.get("required") and not values[f.name]]
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


def reports_known_errors(main):
    """Wraps an absl `main(argv)`: a known error exits with its message."""
    @functools.wraps(main)
    def wrapper(argv):
        try:
            return main(argv)
        except Exception as error:
            if isinstance(error, known_errors()):
                print(f"error: {error}", file=sys.stderr, flush=True)
                sys.exit(1)
            raise
    return wrapper


def job_main(config_cls, run: str):
    """The absl `main` of a job: the config from the flags, then
    `run(config)` ("module:function", imported once the flags are valid)."""
    @reports_known_errors
    def main(argv):
        config = config_from_flags(config_cls, argv)
        logging.set_verbosity(logging.WARNING)
        module, function = run.split(":")
        getattr(importlib.import_module(module), function)(config)
    return main
