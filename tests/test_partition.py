import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colora.data import DataError, label_histogram, partition

SCHEMES = ["iid", "dirichlet", "shards"]


def _balanced(n_per_class=50, classes=4):
    return np.repeat(np.arange(classes), n_per_class)


def assert_valid(parts, n, k):
    assert len(parts) == k
    for p in parts:
        assert isinstance(p, np.ndarray) and p.dtype == np.int64
        assert len(p) >= 1
        assert np.all(np.diff(p) > 0), "sorted, no duplicates"
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_disjoint_cover_sorted_nonempty(scheme):
    labels = np.random.default_rng(3).integers(0, 4, size=403)
    parts = partition(labels, 10, scheme, seed=1)
    assert_valid(parts, 403, 10)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_deterministic_under_seed_and_seed_sensitive(scheme):
    labels = np.random.default_rng(0).integers(0, 4, size=300)
    a = partition(labels, 8, scheme, seed=5)
    b = partition(labels, 8, scheme, seed=5)
    c = partition(labels, 8, scheme, seed=6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_differ_by_at_most_one_and_are_random():
    labels = np.zeros(403, dtype=int)
    parts = partition(labels, 10, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == 403
    # Not contiguous blocks: the first client's indices are spread over the whole range.
    assert parts[0].max() - parts[0].min() > 100


def _mean_max_class_fraction(labels, parts, num_labels):
    hist = label_histogram(labels, parts, num_labels)
    return float(np.mean(hist.max(axis=1) / hist.sum(axis=1)))


def test_dirichlet_small_alpha_is_more_skewed():
    labels = _balanced(100, 4)
    skew = {
        alpha: np.mean([
            _mean_max_class_fraction(labels, partition(labels, 10, "dirichlet", alpha=alpha, seed=s), 4)
            for s in range(4)
        ])
        for alpha in (0.1, 100.0)
    }
    # Balanced 4-class data: iid-like splits sit near 0.25-0.35, strong skew near 1.
    assert skew[0.1] > 0.6
    assert skew[100.0] < 0.45
    assert skew[0.1] > skew[100.0] + 0.25


def test_shards_give_each_client_few_labels_when_shards_align():
    # 4 classes x 50 = 200; 10 clients x 2 shards -> shards of 10 that never straddle a class.
    labels = _balanced(50, 4)
    parts = partition(labels, 10, "shards", shards_per_client=2, seed=0)
    assert_valid(parts, 200, 10)
    assert [len(p) for p in parts] == [20] * 10
    hist = label_histogram(labels, parts, 4)
    assert ((hist > 0).sum(axis=1) <= 2).all()
    # 5 classes x 40, 10 clients x 1 shard of 20: every client holds exactly one label.
    labels = _balanced(40, 5)
    one_shard = partition(labels, 10, "shards", shards_per_client=1, seed=0)
    assert ((label_histogram(labels, one_shard, 5) > 0).sum(axis=1) == 1).all()


def test_shards_keep_leftover_samples_and_bound_labels():
    # 37 samples, 10 clients x 2 shards: shard size 1, 17 samples left over by flwr are reassigned.
    labels = np.random.default_rng(1).integers(0, 3, size=37)
    parts = partition(labels, 10, "shards", shards_per_client=2, seed=2)
    assert_valid(parts, 37, 10)
    assert ((label_histogram(labels, parts, 3) > 0).sum(axis=1) <= 2).all()


def test_histogram_counts():
    labels = np.array([0, 1, 1, 2, 2, 2])
    parts = [np.array([0, 1]), np.array([2, 3, 4, 5])]
    hist = label_histogram(labels, parts, 3)
    assert hist.dtype == np.int64
    assert hist.tolist() == [[1, 1, 0], [0, 1, 3]]
    labels = np.random.default_rng(0).integers(0, 5, size=250)
    parts = partition(labels, 7, "dirichlet", alpha=0.3, seed=0)
    hist = label_histogram(labels, parts, 5)
    assert hist.shape == (7, 5)
    assert hist.sum(axis=1).tolist() == [len(p) for p in parts]
    assert hist.sum(axis=0).tolist() == np.bincount(labels, minlength=5).tolist()


def test_regression_labels_use_five_quantile_bins():
    scores = np.random.default_rng(0).uniform(0, 5, size=200)
    parts = partition(scores, 5, "shards", shards_per_client=1, seed=0, num_labels=1)
    assert_valid(parts, 200, 5)
    hist = label_histogram(scores, parts, 1)
    assert hist.shape == (5, 5)
    # 200 distinct scores -> 40 per quantile bin; one aligned shard per client = one bin each.
    assert hist.sum(axis=0).tolist() == [40] * 5
    assert ((hist > 0).sum(axis=1) == 1).all()
    # Float scores are recognised as regression without num_labels too.
    assert_valid(partition(scores, 5, "dirichlet", alpha=1.0, seed=0), 200, 5)


def test_string_labels():
    labels = ["pos", "neg", "neg", "pos", "neu", "neu"] * 10
    assert_valid(partition(labels, 4, "dirichlet", alpha=1.0, seed=0), 60, 4)


def test_errors():
    labels = _balanced(5, 4)
    with pytest.raises(DataError, match="clients.num=21 exceeds the 20"):
        partition(labels, 21, "iid")
    with pytest.raises(DataError, match="'quantity_skew'"):
        partition(labels, 2, "quantity_skew")
    with pytest.raises(DataError, match="clients.num=0"):
        partition(labels, 0, "iid")
    with pytest.raises(DataError, match="clients.alpha=0"):
        partition(labels, 2, "dirichlet", alpha=0.0)
    with pytest.raises(DataError, match="shards_per_client=3"):
        partition(labels, 10, "shards", shards_per_client=3)
    with pytest.raises(DataError, match=r"label ids must lie in 0\.\.1"):
        partition(labels, 2, "iid", num_labels=2)


def test_tiny_alpha_with_many_clients_is_a_clear_error():
    labels = np.random.default_rng(0).integers(0, 4, size=200)
    with pytest.raises(DataError, match=r"clients\.alpha=0\.01 with 50 clients leaves a client with no data"):
        partition(labels, 50, "dirichlet", alpha=0.01, seed=0)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 120),
    k=st.integers(1, 12),
    classes=st.integers(1, 5),
    scheme=st.sampled_from(SCHEMES),
    seed=st.integers(0, 1000),
)
def test_property_cover_or_clear_error(n, k, classes, scheme, seed):
    labels = np.random.default_rng(seed).integers(0, classes, size=n)
    try:
        parts = partition(labels, k, scheme, alpha=1.0, shards_per_client=2, seed=seed)
    except DataError as e:
        # Only impossible settings may fail: too many clients (or shards) for the data, or a
        # Dirichlet draw that cannot give every client data.
        assert k > n or (scheme == "shards" and 2 * k > n) or (scheme == "dirichlet" and "clients.alpha" in str(e))
        return
    assert_valid(parts, n, k)
