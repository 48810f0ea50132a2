"""Every job's flags are its config dataclasses' fields: same names, same
defaults, nothing on one side only (the dataclass is the one source)."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from contrastive_tf.jobs import config as config_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = {
    "experiments.pretrain": ("PretrainConfig",),
    "experiments.pipeline": ("PretrainConfig", "PipelineConfig"),
    "experiments.finetune": ("FinetuneConfig",),
    "experiments.distill": ("DistillConfig",),
    "experiments.predict": ("PredictConfig",),
}
# Prints {flag: [default, help]} for the flags the job's experiments/ modules define.
_DUMP = """
import importlib, json, sys
from absl import flags
importlib.import_module(sys.argv[1])
defined = {}
for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
    if module.startswith("experiments"):
        for flag in module_flags:
            defined[flag.name] = [flag.default, flag.help]
print(json.dumps(defined))
"""


def _expected(class_names):
    """{name: default} of the configs' flag fields (None where required)."""
    expected = {}
    for name in class_names:
        for field in dataclasses.fields(getattr(config_module, name)):
            if field.metadata.get("config"):
                continue
            default = None if field.default is dataclasses.MISSING else field.default
            if isinstance(default, tuple):
                default = [str(v) for v in default]  # list flags hold strings
            assert expected.setdefault(field.name, default) == default, field.name
    return expected


@pytest.fixture(scope="module")
def job_flags():
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    procs = {job: subprocess.Popen([sys.executable, "-c", _DUMP, job], cwd=ROOT, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for job in JOBS}
    dumped = {}
    for job, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
        dumped[job] = json.loads(out.strip().splitlines()[-1])
    return dumped


@pytest.mark.parametrize("job", sorted(JOBS))
def test_every_field_is_a_flag_with_its_default_and_every_flag_a_field(job, job_flags):
    expected = _expected(JOBS[job])
    got = job_flags[job]
    assert sorted(got) == sorted(expected)
    for name, default in expected.items():
        flag_default = got[name][0]
        if name == "depth" or isinstance(default, (int, float)) and not isinstance(default, bool):
            assert flag_default == default and type(flag_default) is type(default), name
        else:
            assert flag_default == default, name
        assert got[name][1].strip(), f"--{name} has no help"


def test_choices_are_enforced_and_listed(job_flags):
    pretrain = job_flags["experiments.pretrain"]
    assert "One of 18, 34, 50, 101, 152, 200." in pretrain["depth"][1]
    with pytest.raises(ValueError, match="depth must be one of"):
        config_module.PretrainConfig(model_dir="x", depth=19)
    with pytest.raises(ValueError, match="student_init must be one of"):
        config_module.PipelineConfig(output_dir="x", pretrain=config_module.PretrainConfig(
            model_dir="x"), student_init="teacher")
