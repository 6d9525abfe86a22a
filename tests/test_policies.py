"""The runtime's eviction policies on hand-worked cases."""

import pytest

from emoe_jax.predict.base import EVICTION_POLICIES
from emoe_jax.runtime.policies import CLI_POLICIES, POLICIES, make_policy


def _filled(name, keys):
    policy = make_policy(name)
    for key in keys:
        policy.insert(key)
    return policy


def test_lru_evicts_the_oldest_unprotected_key():
    p = _filled("lru", [1, 2, 3])
    p.touch(1)  # order now 2, 3, 1
    assert p.order() == [2, 3, 1]
    assert p.victim() == 2 and p.victim(protected=[2]) == 3
    p.remove(2)
    assert p.victim() == 3


def test_lfu_counts_uses_and_keeps_counts_after_eviction():
    p = _filled("lfu", [1, 2, 3])
    p.touch(1), p.touch(1), p.touch(3)  # counts 1:3, 2:1, 3:2
    assert p.victim() == 2
    p.remove(2)
    p.insert(2)  # back with count 2, now the most recent: ties with 3 (count 2) go to the older, 3
    assert p.victim() == 3 and p.victim(protected=[3]) == 2


def test_score_evicts_the_lowest_score_ties_by_recency():
    p = _filled("score", [1, 2, 3])
    p.set_scores({1: 0.9, 2: 0.5, 3: 0.5})
    assert p.victim() == 2  # 2 and 3 tie; 2 is older
    p.touch(2)
    assert p.victim() == 3
    p.set_scores({3: 0.95})
    assert p.victim() == 2


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_key_protected_is_an_error_and_restore_sets_the_order(name):
    p = _filled(name, [1, 2])
    with pytest.raises(LookupError, match="nothing can be evicted"):
        p.victim(protected=[1, 2])
    p.restore([2, 1])
    assert p.order() == [2, 1] and p.victim() == 2  # equal counts and scores: the oldest


def test_policy_names_come_from_one_list():
    assert set(POLICIES) <= set(EVICTION_POLICIES)
    assert CLI_POLICIES == ("lru", "lfu")  # score needs a predictor's scores
    with pytest.raises(ValueError, match="unknown eviction policy 'mru'"):
        make_policy("mru")
