"""Client shards: disjoint, complete, seeded, skewed as asked."""

import numpy as np
import pytest
import torch

from fedsim.errors import FedsimError
from fedsim.shards import check_batch_size, partition, summary

LABELS = torch.arange(1000) % 10


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_shards_are_disjoint_cover_everything_and_repeat_per_seed(scheme):
    shards = partition(LABELS, 7, scheme, alpha=0.3, seed=4)
    joined = np.concatenate(shards)
    assert len(joined) == len(LABELS) and len(np.unique(joined)) == len(LABELS)
    again = partition(LABELS, 7, scheme, alpha=0.3, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True))
    other = partition(LABELS, 7, scheme, alpha=0.3, seed=5)
    assert not all(np.array_equal(a, b) for a, b in zip(shards, other, strict=True))


def test_iid_shards_have_equal_sizes():
    sizes = [len(s) for s in partition(LABELS, 3, "iid")]
    assert max(sizes) - min(sizes) <= 1


def test_small_alpha_skews_labels_more_than_large_alpha():
    def skew(alpha):
        hist = np.array([row["classes"] for row in summary(partition(LABELS, 5, "dirichlet", alpha, 0), LABELS, 10)])
        share = hist / hist.sum(1, keepdims=True)
        return share.max(1).mean()  # share of each client's most common class

    assert skew(0.1) > 0.5 > skew(100.0)


def test_summary_counts_sizes_and_classes():
    shards = partition(LABELS, 4, "iid", seed=1)
    rows = summary(shards, LABELS, 10)
    assert [r["size"] for r in rows] == [len(s) for s in shards]
    assert sum(sum(r["classes"]) for r in rows) == 1000


def test_examples_per_client_keeps_a_seeded_subset():
    shards = partition(LABELS, 4, "iid", seed=1, examples_per_client=5)
    assert [len(s) for s in shards] == [5, 5, 5, 5]


def test_errors_name_the_problem():
    with pytest.raises(FedsimError, match="more than the 1000 training examples"):
        partition(LABELS, 1001)
    with pytest.raises(FedsimError, match="alpha"):
        partition(LABELS, 3, "dirichlet", alpha=0)
    with pytest.raises(FedsimError, match=r"batch-size = 300 is larger than the smallest shard \(250"):
        check_batch_size(partition(LABELS, 4), 300)
