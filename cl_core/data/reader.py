"""Reading shards for training: a WebDataset pipeline per (Ray worker, DataLoader worker).

An epoch is defined by a plan (:func:`plan_epoch`) that every rank computes alike from
the manifest's per-shard counts: the shards are shuffled by (seed, epoch) and dealt to
``world_size x loader_workers`` slots so sample counts balance; each slot reads its own
shards once (disjoint across slots) and then wraps around within them just enough to
give every rank the same number of full batches, which DDP needs. Every training sample
is seen at least once per epoch; the few repeats are counted in ``EpochPlan``.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cl_core.data.tario import tar_samples


@dataclass(frozen=True)
class Slot:
    shards: tuple[int, ...]  # indices into the split's shard list
    num_samples: int  # distinct samples in those shards
    num_batches: int  # full batches this slot yields this epoch


@dataclass(frozen=True)
class EpochPlan:
    slots: tuple[tuple[Slot, ...], ...]  # [rank][loader worker]
    steps: int  # batches per rank (equal on every rank)
    batch_size: int

    @property
    def unique_samples(self) -> int:
        return sum(s.num_samples for r in self.slots for s in r)

    @property
    def samples_seen(self) -> int:
        return self.steps * self.batch_size * len(self.slots)


def plan_epoch(
    counts: Sequence[int], *, world_size: int, loader_workers: int, batch_size: int, epoch: int, seed: int
) -> EpochPlan:
    """Deal shards to ranks, then to DataLoader workers, balancing sample counts."""
    n_slots_per_rank = max(1, loader_workers)
    if len(counts) < world_size:
        raise ValueError(
            f"{len(counts)} training shards for {world_size} workers: each worker needs its own shard; "
            f"reshard with data.min_shards >= {world_size * n_slots_per_rank}"
        )
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(counts)))
    rng.shuffle(order)
    order.sort(key=lambda i: -counts[i])  # stable: largest first, shuffled among equals

    def deal(items: list[int], bins: int) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in range(bins)]
        load = [0] * bins
        for i in items:
            b = min(range(bins), key=lambda j: (load[j], len(out[j])))
            out[b].append(i)
            load[b] += counts[i]
        return out

    ranks = deal(order, world_size)
    per_rank: list[list[list[int]]] = [deal(r, n_slots_per_rank) for r in ranks]
    batches = [[-(-sum(counts[i] for i in s) // batch_size) for s in r] for r in per_rank]
    steps = max(sum(b) for b in batches)
    slots = []
    for r, bs in zip(per_rank, batches, strict=True):
        bs = list(bs)
        nonempty = [j for j, s in enumerate(r) if s]
        k = 0
        while sum(bs) < steps:  # pad with repeats from this rank's own shards
            bs[nonempty[k % len(nonempty)]] += 1
            k += 1
        slots.append(tuple(Slot(tuple(s), sum(counts[i] for i in s), b) for s, b in zip(r, bs, strict=True)))
    return EpochPlan(tuple(slots), steps, batch_size)


def batches_before(slot_batches: Sequence[int], k: int) -> tuple[list[int], int]:
    """Where batch ``k`` of an epoch stands: how many of the first ``k`` batches each
    DataLoader worker (slot) made, and which slot makes batch ``k``.

    A DataLoader over an IterableDataset takes batches from its workers in turn,
    starting with worker 0, and drops a worker from the turn once it is exhausted: batch
    ``t`` of slot ``j`` comes in round ``t``. To continue at batch ``k``, DataLoader
    worker ``i`` serves slot ``(i + next) % len(slot_batches)``: the turn then goes on in
    the same order."""
    done = [0] * len(slot_batches)
    for t in range(max(slot_batches, default=0)):
        for j, n in enumerate(slot_batches):
            if t < n:
                if k == 0:
                    return done, j
                done[j] += 1
                k -= 1
    if k:
        raise ValueError(f"cannot skip {k} more batches: the epoch has {sum(slot_batches)}")
    return done, 0


def sample_seed(slot_seed: int, position: int) -> int:
    """The augmentation seed of the ``position``-th sample a slot emits in an epoch."""
    return (slot_seed * 1_000_003 + position) % (1 << 63)


def decode_sample(sample: dict) -> tuple[Image.Image, int, int]:
    """(PIL RGB image, label, index) of a shard sample; label -1 when the shard has no
    ``.cls``, index -1 when the pipeline does not number samples."""
    data = sample.get("png", sample.get("jpg", sample.get("jpeg")))
    if data is None:
        raise ValueError(
            f"{sample.get('__url__')}: sample {sample.get('__key__')} has no .png/.jpg image "
            f"(found: {', '.join(k for k in sample if not k.startswith('__'))})"
        )
    with Image.open(io.BytesIO(data)) as im:
        img = im.convert("RGB")  # decodes fully; grayscale digits become 3 equal channels
    return img, int(sample["cls"]) if "cls" in sample else -1, int(sample.get("__index__", -1))


def _with_index(samples: Iterator[dict], offsets: dict[str, int]) -> Iterator[dict]:
    """Number the samples of each shard: ``__index__`` = the shard's offset in the split
    + the sample's position in the shard (a dense index over the split, before shuffling)."""
    seen: dict[str, int] = {}
    for s in samples:
        url = str(s.get("__url__"))
        pos = seen.get(url, 0)
        seen[url] = pos + 1
        s["__index__"] = offsets[url] + pos if url in offsets else -1
        yield s


def sample_pipeline(
    urls: Sequence[str],
    *,
    shuffle_buffer: int = 0,
    seed: int = 0,
    handler: Callable[[Exception], bool] = wds.reraise_exception,
    offsets: dict[str, int] | None = None,
    decode: Callable[[dict], tuple] | None = decode_sample,
    verify: Mapping[str, Mapping] | None = None,
) -> wds.DataPipeline:
    """A WebDataset pipeline over ``urls`` yielding (PIL RGB image, label, index) per sample
    (``decode``'s result: e.g. (text, label, index) with :func:`cl_core.data.text.decode_text`).

    Tar members are read by :func:`cl_core.data.tario.tar_samples` (the same samples as
    ``wds.tarfile_to_samples``, ~6x faster); ``handler`` follows WebDataset's convention.
    ``offsets`` maps each url to the index of its first sample in the split (from the
    manifest's counts); the index is -1 without it. ``decode=None`` yields the raw
    samples (dicts of bytes). ``verify`` (``ShardCheck.verify``) checks each shard read to
    its end against the manifest's sha256 and lets a known-truncated shard end early.
    """
    stages: list = [wds.SimpleShardList(list(urls)), partial(tar_samples, handler=handler, verify=verify)]
    if offsets is not None:
        stages.append(partial(_with_index, offsets=offsets))
    if shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(seed)))
    if decode is not None:
        stages.append(wds.map(decode, handler=handler))
    return wds.DataPipeline(*stages)


class ShardStream(IterableDataset):
    """The training stream of one Ray worker (``rank``) for one epoch.

    Call :meth:`set_epoch` before iterating. Yields ``(views, label, index)`` where
    ``views`` is the list returned by ``transform`` (e.g. two augmented views) and
    ``index`` the sample's dense position in the split (``urls`` order, ``counts``).

    The epoch is a pure function of (seed, epoch): the shard deal, the read order and
    every sample's augmentation (seeded per sample), so ``set_epoch(e, skip_batches=k)``
    continues an interrupted epoch exactly at its batch ``k``; the skipped samples are
    read from the tar but neither decoded nor augmented.
    """

    def __init__(
        self,
        urls: Sequence[str],
        counts: Sequence[int],
        *,
        transform: Callable,
        batch_size: int,
        rank: int,
        world_size: int,
        loader_workers: int,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        decode: Callable[[dict], tuple] = decode_sample,
        verify: Mapping[str, Mapping] | None = None,
        collate: Callable[[list], Any] | None = None,
    ) -> None:
        self.collate = collate  # the DataLoader's collate_fn (None: its default)
        self.verify = dict(verify) if verify else None  # url -> {"sha256", "truncated"}: ShardCheck.verify
        self.urls, self.counts = list(urls), list(counts)
        self.decode = decode  # shard sample -> (input, label, index); input goes to ``transform``
        self.transform, self.batch_size = transform, batch_size
        self.rank, self.world_size, self.loader_workers = rank, world_size, loader_workers
        self.shuffle_buffer, self.seed, self.epoch, self.skip_batches = shuffle_buffer, seed, 0, 0
        starts = np.cumsum([0, *self.counts[:-1]]).tolist()
        self.offsets = {u: int(o) for u, o in zip(self.urls, starts, strict=True)}

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Read epoch ``epoch`` from its batch ``skip_batches`` on (this rank's batches)."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def plan(self) -> EpochPlan:
        return plan_epoch(
            self.counts,
            world_size=self.world_size,
            loader_workers=self.loader_workers,
            batch_size=self.batch_size,
            epoch=self.epoch,
            seed=self.seed,
        )

    @property
    def num_samples(self) -> int:
        return sum(self.counts)

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], int, int]]:
        info = get_worker_info()
        slots = self.plan().slots[self.rank]
        done, first = batches_before([s.num_batches for s in slots], self.skip_batches)
        worker = ((info.id if info is not None else 0) + first) % len(slots)  # the slot this DataLoader worker serves
        slot = slots[worker]
        quota = slot.num_batches * self.batch_size
        skip = done[worker] * self.batch_size
        if quota == 0:
            return
        # views are a pure function of (seed, epoch, rank, slot, position): reproducible runs
        slot_seed = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}").getrandbits(31)
        generator = torch.default_generator
        rng = random.Random(slot_seed)
        shards = [self.urls[i] for i in slot.shards]
        emitted, passes = 0, 0
        while emitted < quota:
            rng.shuffle(shards)
            before = emitted
            for sample in sample_pipeline(
                shards,
                shuffle_buffer=self.shuffle_buffer,
                seed=slot_seed + passes,
                offsets=self.offsets,
                decode=None,
                verify=self.verify,
            ):
                if emitted >= skip:
                    generator.manual_seed(sample_seed(slot_seed, emitted))
                    x, label, index = self.decode(sample)
                    yield self.transform(x), label, index
                emitted += 1
                if emitted == quota:
                    return
            passes += 1
            if emitted == before:
                raise RuntimeError(f"shards {shards} yielded no samples; check the shard set's manifest")


def training_loader(stream: ShardStream, *, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over ``stream``: each DataLoader worker batches its own slot.

    Every sample's randomness comes from its own seed (``sample_seed``), so the loader's
    generator is a private one: starting an epoch's workers draws their base seed from
    it, not from the global generator, which a resumed run restores from its checkpoint
    and which must go on as in the uninterrupted run (dropout, the methods' own draws)."""
    return DataLoader(
        stream,
        batch_size=stream.batch_size,
        collate_fn=stream.collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(stream.seed),
    )


def load_split(
    urls: Sequence[str],
    transform: Callable[[Image.Image], torch.Tensor],
    verify: Mapping[str, Mapping] | None = None,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample of ``urls`` in order (the first ``limit`` with one), transformed:
    (images (N, C, H, W), labels (N,))."""
    xs: list[torch.Tensor] = []
    ys: list[int] = []
    for img, label, _ in sample_pipeline(urls, verify=verify):
        if limit is not None and len(xs) >= limit:
            break
        xs.append(transform(img))
        ys.append(label)
    if not xs:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.stack(xs), torch.as_tensor(np.asarray(ys), dtype=torch.long)


class EvalSplit:
    """A split read in transformed batches for repeated evaluation (the val checks of
    fine-tuning and distillation), with memory bounded independently of its size.

    The first pass streams the split from its shards; when the whole split, transformed,
    fits in ``cache_bytes`` it is kept and later passes reuse it (a small val split is
    decoded once); otherwise every pass streams it again and nothing is kept. Each pass
    yields ``(images, labels)`` batches of ``batch_size`` in shard order, the same batches
    either way."""

    def __init__(
        self,
        urls: Sequence[str],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        verify: Mapping[str, Mapping] | None = None,
        batch_size: int = 512,
        cache_bytes: int = 64 << 20,
    ):
        self.urls, self.transform, self.verify = list(urls), transform, verify
        self.batch_size, self.cache_bytes = batch_size, cache_bytes
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._streamed = False  # a pass found the split larger than the cache

    @property
    def cached(self) -> bool:
        return self._cache is not None

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._cache is not None:
            yield from self._cache
            return
        keep: list[tuple[torch.Tensor, torch.Tensor]] | None = None if self._streamed else []
        size = 0
        xs: list[torch.Tensor] = []
        ys: list[int] = []
        samples = iter(sample_pipeline(self.urls, verify=self.verify))
        done = False
        while not done:
            for img, label, _ in samples:
                xs.append(self.transform(img))
                ys.append(int(label))
                if len(xs) == self.batch_size:
                    break
            else:
                done = True
            if not xs:
                break
            b = torch.stack(xs), torch.as_tensor(ys, dtype=torch.long)
            xs, ys = [], []
            if keep is not None:
                size += b[0].numel() * b[0].element_size()
                if size <= self.cache_bytes:
                    keep.append(b)
                else:  # too large to keep: every pass streams
                    keep, self._streamed = None, True
            yield b
        if keep is not None:  # the whole split fitted
            self._cache = keep
