"""The request path's in-flight counters on the real Redis: counted while a forward runs, given
back after it, and never left behind without an expiry."""

from django.core.cache import cache, caches

from serving import counters


def _ttl(key: str) -> int:
    backend = caches["default"]
    return backend._cache.get_client().ttl(backend.make_and_validate_key(key))


def test_a_forward_counts_in_flight_with_an_expiry_and_gives_it_back(settings):
    settings.SERVING_FORWARD_TIMEOUT_S = 30
    key = counters._replica_key(7)
    with counters.in_flight(deployment_id=1, version_id=2, replica_id=7):
        with counters.in_flight(deployment_id=1, version_id=2, replica_id=7):
            assert counters.version_in_flight(deployment_id=1, version_id=2) == 2
            assert counters.replicas_in_flight([7, 8]) == {7: 2, 8: 0}
            assert 0 < _ttl(key) <= 120
        assert counters.replicas_in_flight([7]) == {7: 1}
    assert counters.version_in_flight(deployment_id=1, version_id=2) == 0
    assert counters.replicas_in_flight([7]) == {7: 0}


def test_a_counter_that_expired_mid_forward_does_not_come_back_without_an_expiry():
    """Its decrement would otherwise create it at -1 for good."""
    key = counters._version_key(1, 3)
    with counters.in_flight(deployment_id=1, version_id=3, replica_id=9):
        cache.delete(key)
    assert cache.get(key) is None
    with counters.in_flight(deployment_id=1, version_id=3, replica_id=9):
        assert counters.version_in_flight(deployment_id=1, version_id=3) == 1
        assert _ttl(key) > 0
