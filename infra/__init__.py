"""Infrastructure helpers: storage, the local stack, cluster helpers."""
