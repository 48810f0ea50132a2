"""The checkpoint guard on a tiny model: what it saves, refuses and reports.

The end-to-end runs (a blown-up run, a full disk, a killed job) are in
test_pretrain.py; these check each rule of `runs/checkpoints.py` in
milliseconds, against expectations computed here.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from contrastive_tf.method import optim
from contrastive_tf.runs import checkpoints


def _model_and_manager(tmp_path, every_steps=2, total_steps=5):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2),
                              keras.layers.BatchNormalization()])
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9), loss="mse")
    model.optimizer.build(model.trainable_variables)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    manager = tf.train.CheckpointManager(checkpoint, str(tmp_path), max_to_keep=10)
    schedule = optim.WarmupCosine(1.0, 2, total_steps)
    guard = checkpoints.CheckpointAndGuard(manager, every_steps, total_steps, schedule)
    guard.set_model(model)
    return model, manager, guard, schedule


def _step(model, guard, step, loss=0.5):
    model.optimizer.iterations.assign(step)
    logs = {"loss": np.float32(loss)}
    guard.on_train_batch_end(step - 1, logs)
    return logs


def test_saves_every_interval_and_the_last_step_and_logs_the_learning_rate(tmp_path):
    model, manager, guard, schedule = _model_and_manager(tmp_path, every_steps=2,
                                                         total_steps=5)
    rates = []
    for step in range(1, 6):
        rates.append(_step(model, guard, step)["learning_rate"])
        assert model.stop_training == (step == 5)
    saved = sorted(int(p.rsplit("-", 1)[1]) for p in manager.checkpoints)
    assert saved == [2, 4, 5]  # every 2 steps, and the last (5 is not a multiple)
    # The rate that step used: the schedule at the step's own index (step - 1).
    expected = [float(schedule(step - 1)) for step in range(1, 6)]
    np.testing.assert_allclose(rates, expected, rtol=1e-6)
    assert rates[0] == pytest.approx(0.0) and rates[2] == pytest.approx(1.0)


def test_a_non_finite_loss_stops_training_before_anything_is_saved(tmp_path):
    model, manager, guard, _ = _model_and_manager(tmp_path)
    _step(model, guard, 2)
    with pytest.raises(checkpoints.NonFiniteLossError,
                       match=r"loss is inf at step 4.*last good checkpoint is .*ckpt-2"):
        _step(model, guard, 4, loss=np.inf)
    assert model.stop_training
    assert [int(p.rsplit("-", 1)[1]) for p in manager.checkpoints] == [2]


@pytest.mark.parametrize("where", ["kernel", "moving_variance", "momentum"])
def test_non_finite_state_is_refused_wherever_it_is(tmp_path, where):
    # Weights, batch-norm statistics and the optimizer's slots are all
    # saved, so NaN in any of them must stop the save and be named.
    model, manager, guard, _ = _model_and_manager(tmp_path)
    _step(model, guard, 2)
    if where == "kernel":
        variable = model.layers[0].kernel
    elif where == "moving_variance":
        variable = model.layers[1].moving_variance
    else:
        variable = model.optimizer.momentums[0]
    values = variable.numpy()
    values.flat[0] = np.nan
    variable.assign(values)
    with pytest.raises(checkpoints.NonFiniteLossError) as error:
        _step(model, guard, 4)
    message = str(error.value)
    assert "after step 4" in message and "1 variable(s)" in message
    assert getattr(variable, "path", variable.name) in message
    assert message.endswith("use float32 / mixed_bfloat16.")
    assert "last good checkpoint is " + manager.latest_checkpoint in message
    assert [int(p.rsplit("-", 1)[1]) for p in manager.checkpoints] == [2]


def test_the_finite_check_covers_every_float_variable_and_nothing_else(tmp_path):
    model, _, guard, _ = _model_and_manager(tmp_path)
    check = checkpoints.FiniteStateCheck(model)
    expected = ({id(v) for v in model.variables}
                | {id(v) for v in model.optimizer.variables if v.dtype == "float32"})
    assert {id(v) for v in check.variables} == expected
    assert all(v.dtype != "int64" for v in check.variables)  # the step counter is not
    assert check() and check.non_finite_names() == []


def test_a_failed_checkpoint_write_removes_its_partial_files(tmp_path, monkeypatch):
    model, manager, guard, _ = _model_and_manager(tmp_path)
    _step(model, guard, 2)
    intact = manager.latest_checkpoint

    def full_disk(checkpoint_number=None):
        # What a write cut short leaves: a temporary folder and a data file.
        os.makedirs(os.path.join(str(tmp_path), f"ckpt-{checkpoint_number}_temp"))
        open(os.path.join(str(tmp_path), f"ckpt-{checkpoint_number}.index"), "w").close()
        raise tf.errors.ResourceExhaustedError(None, None, "No space left on device")

    monkeypatch.setattr(manager, "save", full_disk)
    with pytest.raises(checkpoints.CheckpointWriteError) as error:
        _step(model, guard, 4)
    assert str(error.value) == (
        f"could not write checkpoint 4 to {tmp_path}: No space left on device. The last "
        f"complete checkpoint, {intact}, is intact; free some space and rerun the same "
        "command to resume from it.")
    left = sorted(os.listdir(tmp_path))
    assert not [name for name in left if name.startswith("ckpt-4")], left
    assert "ckpt-2.index" in left and "checkpoint" in left


def test_check_resumable_lists_every_difference(tmp_path):
    from contrastive_tf.runtime.files import write_json
    write_json(str(tmp_path / "config.json"), {"depth": 18, "base_width": 16})
    with pytest.raises(checkpoints.ResumeError) as error:
        checkpoints.check_resumable(str(tmp_path), {"depth": 34, "base_width": 8}, True)
    assert str(error.value) == (
        f"{tmp_path} holds checkpoints of a different model (depth: checkpoint has 18, "
        "now 34, base_width: checkpoint has 16, now 8); refusing to resume. Use another "
        "`model_dir`, or delete that one to start over.")
