"""The library's progress lines: [stage] message on stdout, warnings on stderr."""

import logging
import subprocess
import sys
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = """
import logging
from contrastive_tf.runtime import progress
log = progress.logger("pretrain")
log.info("hidden: nothing is shown before show()")
progress.show(rewrite=lambda text: text.replace("`batch_size`", "--batch_size"))
log.info("step %d of %d", 3, 9)
log.info("\\nafter a progress bar")
logging.getLogger("contrastive_tf.data").warning("lower `batch_size`")
log.debug("not shown at INFO")
logging.getLogger("other").warning("not ours")
"""


def test_show_prints_stage_lines_and_warnings_apart():
    result = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=ROOT, capture_output=True,
                            text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[pretrain] step 3 of 9\n\n[pretrain] after a progress bar\n"
    assert "warning: [data] lower --batch_size\n" in result.stderr
    assert "hidden" not in result.stdout + result.stderr
    assert "not ours" in result.stderr  # other loggers keep Python's default handling


def test_library_logs_reach_standard_logging(caplog):
    from contrastive_tf.runtime import progress
    with caplog.at_level(logging.INFO, logger="contrastive_tf"):
        progress.logger("finetune").info("hello %s", "there")
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("contrastive_tf.finetune", "hello there")]


def test_jobs_name_flags_where_the_library_names_arguments():
    from absl import flags
    from experiments import jobs
    if "as_flags_probe" not in flags.FLAGS:  # a name no config uses
        flags.DEFINE_integer("as_flags_probe", 1, "test flag")
    assert jobs.as_flags("lower `as_flags_probe` or `no_such_flag`") == \
        "lower --as_flags_probe or `no_such_flag`"
