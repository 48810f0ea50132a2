"""Progress messages, through Python's `logging`.

Library code reports on the logger of its stage, `contrastive_tf.<stage>`
(`logger("pretrain")`): INFO for progress and results, WARNING for what a
user should act on. A library shows nothing unless the application asks:
the jobs call `show()`, which prints INFO lines as `[stage] message` on
stdout and warnings as `warning: [stage] message` on stderr. From Python,
call `contrastive_tf.progress.show()` for the same lines, or configure the
`contrastive_tf` logger as any other. Messages name a function's argument
as `name`; the jobs print it as their flag, --name.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings

ROOT = "contrastive_tf"


def logger(stage: str) -> logging.Logger:
    """The logger of a stage (`"pretrain"`, `"pipeline"`, ...)."""
    return logging.getLogger(f"{ROOT}.{stage}")


class _StageFormat(logging.Formatter):
    def __init__(self, rewrite=None):
        super().__init__()
        self.rewrite = rewrite or (lambda text: text)

    def format(self, record: logging.LogRecord) -> str:
        stage = record.name[len(ROOT) + 1:] or ROOT
        message = self.rewrite(record.getMessage())
        body = message.lstrip("\n")  # leading newlines go before the prefix
        text = f"{message[:len(message) - len(body)]}[{stage}] {body}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text if record.levelno < logging.WARNING else f"warning: {text}"


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def show(level: int = logging.INFO, rewrite=None) -> None:
    """Prints the library's messages from `level` up: progress on stdout,
    warnings on stderr (calling it again replaces the earlier setup).
    `rewrite(text)`, if given, edits each message (the jobs turn the
    arguments a message names, `name`, into their flags, --name)."""
    root = logging.getLogger(ROOT)
    for handler in [h for h in root.handlers if getattr(h, "_contrastive_tf", False)]:
        root.removeHandler(handler)
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_Below(logging.WARNING))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(_StageFormat(rewrite))
        handler._contrastive_tf = True
        root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False  # not again through absl's root handler


@contextlib.contextmanager
def evaluation_passes_end():
    """Keras 3 warns "Your input ran out of data; interrupting training"
    whenever a dataset of unknown length ends, evaluation included. A pass
    over a folder's files (unreadable ones filtered out, so its length is
    unknown) ends by design; inside this context that one warning is not
    shown. Wrap only evaluation, and fits whose training stream is endless
    (the message can then only come from their validation pass)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Your input ran out of data",
                                category=UserWarning)
        yield
