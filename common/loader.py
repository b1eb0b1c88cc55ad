"""Data loaders whose batches are a pure function of (seed, epoch, position): resumable mid-epoch.

``TrainBatchSampler`` draws epoch e's order from (seed, e), shards it over ranks like
``DistributedSampler`` and yields batches of ``(index, sample_seed)`` pairs; ``SeededDataset`` runs every
item under its own sample seed. An item's augmentation therefore depends neither on the worker that
loads it nor on the number of workers, and a run resumed at iteration i sees exactly the batches and
augmentations the uninterrupted run saw from i on. Optional aspect-ratio grouping (landscape vs
portrait, as detectron2's ``AspectRatioGroupedDataset``; torchvision's references use
``GroupedBatchSampler`` for the same purpose) keeps padding small.
"""
import contextlib
import functools
import multiprocessing
import os
import random
import signal
import threading

import numpy as np
import torch

from common import dist
from common.errors import UserError


class TrainBatchSampler(torch.utils.data.Sampler):
    """Deterministic, distributed, resumable batch sampler (drop_last semantics).

    num_items: dataset length. batch_size: per rank. group_ids: optional group per index; a batch
    holds one group only, except for at most (groups - 1) batches of leftovers at the end of an epoch.
    """

    def __init__(self, num_items, batch_size, seed=0, group_ids=None):
        self.num_items, self.batch_size, self.seed, self.group_ids = num_items, batch_size, seed, group_ids
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.per_rank = -(-num_items // self.world)  # padded by wrapping, as DistributedSampler does
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise UserError(f"--batch-size {batch_size}: the training set has {num_items} items, fewer than one "
                            f"batch of {batch_size} per process x {self.world} processes; lower --batch-size")
        self.epoch, self.start_batch, self.epochs = 0, 0, 1

    def set_epoch(self, epoch, start_batch=0, epochs=1):
        """Selects epochs ``epoch`` .. epoch + epochs - 1, in one pass, and skips the first ``start_batch``
        batches (mid-epoch resume). One pass over several epochs keeps a DataLoader's workers loading across
        epoch ends (a new pass per epoch waits for its first batch: on a small set, every few iterations)."""
        self.epoch, self.start_batch, self.epochs = epoch, start_batch, epochs

    def _epoch_batches(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        order = torch.randperm(self.num_items, generator=g)
        seeds = torch.randint(0, 2**31 - 1, (self.num_items,), generator=g)
        total = self.per_rank * self.world
        order = torch.cat([order, order[: total - self.num_items]])
        seeds = torch.cat([seeds, seeds[: total - self.num_items] + 1])
        mine = list(zip(order[self.rank::self.world].tolist(), seeds[self.rank::self.world].tolist()))
        if self.group_ids is None:
            return [mine[i:i + self.batch_size] for i in range(0, self.batches_per_epoch * self.batch_size,
                                                                self.batch_size)]
        batches, buckets = [], {}
        for item in mine:
            bucket = buckets.setdefault(self.group_ids[item[0]], [])
            bucket.append(item)
            if len(bucket) == self.batch_size:
                batches.append(list(bucket))
                bucket.clear()
        leftovers = [item for key in sorted(buckets) for item in buckets[key]]
        batches += [leftovers[i:i + self.batch_size] for i in range(0, len(leftovers), self.batch_size)]
        return batches[: self.batches_per_epoch]

    def __iter__(self):
        for epoch in range(self.epoch, self.epoch + self.epochs):
            yield from self._epoch_batches(epoch)[self.start_batch if epoch == self.epoch else 0:]

    def __len__(self):
        return self.batches_per_epoch * self.epochs - self.start_batch


@contextlib.contextmanager
def seeded(seed):
    """Seeds torch's CPU generator, numpy and python RNGs for the block, restoring their states afterwards.
    (torch.manual_seed would also queue a seed for every accelerator backend: ~0.1 ms per item for nothing
    the loader draws from.)"""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededDataset(torch.utils.data.Dataset):
    """Runs ``dataset[idx]`` under the sample's seed; an item that comes back None (a bad image that the
    dataset was told to skip) is replaced by the next index and counted in ``bad_images``."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.bad_images = multiprocessing.Value("i", 0)  # shared with forked workers

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        idx, seed = key
        with seeded(seed):
            for offset in range(len(self.dataset)):
                item = self.dataset[(idx + offset) % len(self.dataset)]
                if item is not None:
                    return item
                with self.bad_images.get_lock():
                    self.bad_images.value += 1
        raise RuntimeError("every image of the dataset failed to load")


def skipped_images(loader):
    """Bad images skipped so far by ``loader``'s SeededDataset, summed over ranks (collective: every rank
    calls it); 0 for a loader of another dataset. The count is of skips: an image drawn in two epochs counts
    twice."""
    counter = getattr(loader.dataset, "bad_images", None)
    return sum(dist.all_gather_object(counter.value if counter is not None else 0))


def collate_detection(batch):
    """[(image, target), ...] -> (images, targets) tuples; None items (skipped bad images) are dropped."""
    batch = [b for b in batch if b is not None]
    return tuple(zip(*batch)) if batch else ((), ())


def aspect_groups(dataset):
    """0 for portrait, 1 for landscape images (needs ``dataset.aspect_ratios()``)."""
    return [int(r >= 1.0) for r in dataset.aspect_ratios()]


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
CAN_TAKE_SIGNALS = hasattr(signal, "sigwaitinfo")  # Linux; not macOS, where workers keep PyTorch's handling


def _leave_stop_signals_to_the_main_process(worker_id, main_pid):
    """Worker init: SIGTERM and SIGINT stay blocked in the worker (since the fork, StopSafeDataLoader.__iter__)
    and a thread takes them with their sender: a SIGTERM from the main process (which ends its workers so,
    e.g. at its exit), or any of them once the main process is gone, ends the worker, as PyTorch's own
    handler does; from anyone else (a scheduler signalling the whole job) they do nothing."""
    def take_stop_signals():
        while True:
            info = signal.sigwaitinfo(STOP_SIGNALS)
            if (info.si_signo == signal.SIGTERM and info.si_pid == main_pid) or os.getppid() != main_pid:
                os._exit(0)  # (an orphan is adopted by another process at once)

    threading.Thread(target=take_stop_signals, name="stop-signals", daemon=True).start()


class StopSafeDataLoader(torch.utils.data.DataLoader):
    """A DataLoader whose worker processes leave SIGTERM and SIGINT to the main process.

    SLURM, Kubernetes, ``timeout`` and Ctrl-C signal every process of a job, the workers included. A
    PyTorch worker dies of a SIGTERM that its parent did not send, and the main process then fails with
    "DataLoader worker (pid N) is killed by signal: Terminated". Here the main process decides: it stops the
    run at the next boundary with a checkpoint (common.engine.Run) and ends its workers as it exits. The
    workers are forked (as this module and common.coco expect; Python 3.14 would start them from a
    forkserver) with the signals blocked, so that no thread of theirs ever has them unblocked and one that
    comes while they start is not lost on them either; programs a worker starts inherit them blocked (a
    stop is the main process' to make)."""

    def __init__(self, *args, **kwargs):
        if CAN_TAKE_SIGNALS and kwargs.get("num_workers", 0) > 0:
            kwargs.update(multiprocessing_context="fork", worker_init_fn=functools.partial(
                _leave_stop_signals_to_the_main_process, main_pid=os.getpid()))
        super().__init__(*args, **kwargs)

    def __iter__(self):
        if self.num_workers == 0 or not CAN_TAKE_SIGNALS:
            return super().__iter__()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super().__iter__()  # forks the workers (the first time, for persistent ones)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # one that came meanwhile is handled now


def build_train_loader(dataset, batch_size, workers, seed, device, collate_fn=collate_detection,
                       group_ids=None):
    sampler = TrainBatchSampler(len(dataset), batch_size, seed, group_ids)
    # its own generator: creating a loader iterator must not draw from the global RNG (exact resume)
    return StopSafeDataLoader(
        SeededDataset(dataset), batch_sampler=sampler, num_workers=workers, collate_fn=collate_fn,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None, generator=torch.Generator().manual_seed(seed))


class ShardSampler(torch.utils.data.Sampler):
    """Every world-th index from this rank's offset, unpadded (each image is evaluated exactly once)."""

    def __init__(self, num_items):
        self.indices = list(range(dist.get_rank(), num_items, dist.get_world_size()))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


def build_eval_loader(dataset, batch_size, workers, device, collate_fn=collate_detection):
    return StopSafeDataLoader(
        dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset)), num_workers=workers,
        collate_fn=collate_fn, pin_memory=device.type == "cuda")
