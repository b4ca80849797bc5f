"""Sources, shard writing and shard reading."""
