import pytest

from grpo_prune.pruning.reward_guard import RewardGuard


def test_records_reward_before_and_after_each_event():
    guard = RewardGuard(window=2)
    for r in (1.0, 3.0):
        guard.update(r)
    event = guard.record_event(step=5)
    assert event["reward_before"] == 2.0 and event["reward_after"] is None
    assert guard.update(0.0) == []
    done = guard.update(1.0)
    assert done == [event] and event["reward_after"] == 0.5
    assert guard.public_events() == [{"step": 5, "reward_before": 2.0, "reward_after": 0.5}]


def test_guard_holds_until_reward_recovers():
    guard = RewardGuard(window=1, tolerance=0.1)
    guard.update(1.0)
    guard.record_event(step=1)
    guard.update(0.85)
    assert guard.should_hold()  # 0.85 < 0.9
    guard.update(0.95)
    assert not guard.should_hold()


def test_guard_uses_magnitude_for_negative_rewards():
    guard = RewardGuard(window=1, tolerance=0.5)
    guard.update(-2.0)
    guard.record_event(step=0)
    guard.update(-2.5)
    assert not guard.should_hold()  # threshold -3.0
    guard.update(-3.5)
    assert guard.should_hold()


def test_no_tolerance_never_holds_and_nan_is_ignored():
    guard = RewardGuard(window=2)
    guard.update(1.0)
    guard.record_event(step=0)
    guard.update(-100.0)
    assert not guard.should_hold()
    guard.update(float("nan"))
    assert guard.rolling_mean() == pytest.approx(-49.5)


def test_state_round_trip():
    guard = RewardGuard(window=3, tolerance=0.2)
    for r in (0.1, 0.2, 0.3):
        guard.update(r)
    guard.record_event(2)
    guard.update(0.4)
    restored = RewardGuard(window=3, tolerance=0.2)
    restored.load_state_dict(guard.state_dict())
    assert restored.state_dict() == guard.state_dict()
    assert restored.update(0.5) == guard.update(0.5) == []


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"tolerance": 1.0}, {"tolerance": -0.1}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        RewardGuard(**kwargs)
