"""What every job does with the errors it knows: one line, exit status 1.

Bad data, a run that cannot be resumed, a training run that blew up, a
checkpoint or export that could not be written: each of these errors
already says what went wrong and what to do, so a job prints that sentence
(`error: ...`) instead of a traceback. Anything else is a bug and keeps its
traceback.
"""

import functools
import sys


def known_errors() -> tuple[type, ...]:
    """The library's errors a user can cause and fix."""
    from contrastive_tf.data import DataError
    from contrastive_tf.export import ExportError
    from contrastive_tf.training import CheckpointWriteError, NonFiniteLossError, ResumeError
    return DataError, ResumeError, NonFiniteLossError, CheckpointWriteError, ExportError


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
