"""LinearAnnealing: values along the schedule, validation, round trip."""

import pytest

from trainable_infra import LinearAnnealing, QuantizationConfigError


@pytest.mark.parametrize(("step", "expected"), [(0, 2.0), (10, 2.0), (15, 1.0), (20, 0.0), (1000, 0.0)])
def test_value_moves_linearly_between_start_and_end(step, expected):
    schedule = LinearAnnealing(t_start=10, t_end=20, initial_value=2.0, target_value=0.0)
    assert schedule(step) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"t_start": -1}, "t_start must be an int >= 0, got -1"),
        ({"t_end": 1.5}, "t_end must be an int >= 0, got 1.5"),
        ({"t_start": 5, "t_end": 5}, "t_end must be greater than t_start"),
        ({"initial_value": float("nan")}, "initial_value must be a finite number"),
        ({"target_value": "0"}, "target_value must be a finite number"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    arguments = {"t_start": 0, "t_end": 10, "initial_value": 1.0, "target_value": 0.0, **kwargs}
    with pytest.raises(QuantizationConfigError, match=message):
        LinearAnnealing(**arguments)


def test_round_trip_and_repr():
    schedule = LinearAnnealing(0, 100, 1.0, 0.25)
    assert LinearAnnealing.from_dict(schedule.to_dict()) == schedule
    assert repr(schedule) == "LinearAnnealing(t_start=0, t_end=100, initial_value=1.0, target_value=0.25)"
    with pytest.raises(QuantizationConfigError, match="expects keys"):
        LinearAnnealing.from_dict({"t_start": 0})
