"""``emseg.runtime.Runtime``: the run-time choices, checked once, and honoured by the training loop."""
from __future__ import annotations

import pytest

from conftest import tiny_train_config
from emseg.engine.config import config_from_dict
from emseg.errors import InputError
from emseg.runtime import Runtime
from emseg.semantic.train import train


@pytest.mark.parametrize("field, value", [
    ("device", "gpu"), ("device", 3), ("seed", -1), ("seed", 2**63), ("seed", True), ("seed", 1.5),
    ("precision", "fp16"), ("threads", 0), ("threads", True),
])
def test_bad_choices_are_input_errors_naming_the_field(field, value):
    with pytest.raises(InputError, match=field):
        Runtime(**{field: value})


def test_precision_or_keeps_the_config_unless_the_runtime_says_otherwise():
    assert Runtime().precision_or("fp32") == "fp32"
    assert Runtime(precision="bf16").precision_or("fp32") == "bf16"


def test_the_training_loop_runs_at_the_runtime_precision_and_seed(tmp_path, synthetic_h5):
    # bf16 in the config (refused on a CPU without it), fp32 in the runtime: the runtime wins
    config = config_from_dict(tiny_train_config(synthetic_h5, steps=2, amp=True, precision="bf16"))
    a = train(config, tmp_path / "a", runtime=Runtime(device="cpu", seed=3, precision="fp32"))
    b = train(config, tmp_path / "b", runtime=Runtime(device="cpu", seed=3, precision="fp32"))
    c = train(config, tmp_path / "c", runtime=Runtime(device="cpu", seed=4, precision="fp32"))
    assert a.precision == "fp32"
    assert a.losses == b.losses  # the seed decides the run
    assert a.losses != c.losses
