"""The DataLoader pipeline's test-set sharding: the ranks' shares cover each test image exactly once."""

from __future__ import annotations

import pytest

from cifar.data import evaluation_shard


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_evaluation_shards_cover_each_index_exactly_once(world_size):
    for size in (0, 1, 2, 7, 64, 100, 101, 128):
        shards = [evaluation_shard(size, rank, world_size) for rank in range(world_size)]
        # Sorted, the shards together are 0..size-1: none missing, none twice (padding would repeat some).
        assert sorted(index for shard in shards for index in shard) == list(range(size)), f"{size} items"
        assert max(map(len, shards)) - min(map(len, shards)) <= 1, f"{size} items"
