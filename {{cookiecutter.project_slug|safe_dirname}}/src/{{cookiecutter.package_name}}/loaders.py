"""Stage 3's DataLoaders: the training loader, resumable to the batch with any number of workers, and the
validation loader. `training.build` makes them, so training, the doctor and the benchmarks see the same batches.

The order of an epoch's training batches depends only on (seed, epoch): a DistributedSampler's shuffle (also
for one process) split into batches by `EpochBatches`. Each batch carries its own seed, derived from
(seed, epoch, rank, batch number), and the collate runs the batch's augmentation (`Task.train_transform`) and
transform (`Task.fault_batch`) with torch's, numpy's and Python's global generators seeded by it. So a batch's
random numbers do not depend on the number of workers, on which worker builds it, or on the batches before it:
a run resumed mid-epoch skips the batches it had trained on (without loading them) and then sees exactly the
batches of an uninterrupted run. A dataset's own `__getitem__` should draw no random numbers (augment in
`train_transform`): in worker processes those come from a per-worker, per-epoch seed instead.
"""

import contextlib
import functools
import itertools
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from . import batches


def batch_seed(seed, epoch, rank, number):
    """The 32-bit seed of batch `number` of `epoch` on process `rank`: numpy's SeedSequence mixes the four,
    so nearby batches get unrelated streams."""
    return int(np.random.SeedSequence([seed, epoch, rank, number]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rngs(seed):
    """Inside: torch's (CPU), numpy's and Python's global generators seeded with `seed`. After: all three as
    they were (the main process's stream, e.g. dropout's, is not disturbed)."""
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed also seeds every accelerator (~0.1 ms per batch)
        torch.default_generator.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


class EpochBatches(BatchSampler):
    """The training loader's batch sampler: the batches of `sampler` (a DistributedSampler, whose order
    depends only on its seed and epoch), each index paired with its batch's seed (`batch_seed`).
    `start` skips the first batches of the epoch (those a preempted run had trained on) without loading them."""

    def __init__(self, sampler: DistributedSampler, batch_size, drop_last):
        super().__init__(sampler, batch_size, drop_last)
        self.start = 0

    def __iter__(self):
        order = self.sampler
        for number, indices in itertools.islice(enumerate(super().__iter__()), self.start, None):
            seed = batch_seed(order.seed, order.epoch, order.rank, number)
            yield [(index, seed) for index in indices]

    def __len__(self):
        return max(0, super().__len__() - self.start)


class SeededItems(Dataset):
    """`dataset` read with EpochBatches' (index, batch seed) keys: each item comes back with its batch's seed."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        return seed, self.dataset[index]


def collate_and_augment(items, augment=None, transform=None):
    """The loaders' collate: stack the samples, `augment` the whole batch at once (the task's
    `train_transform`), then `transform` it (an injected fault in what the network sees, `fault_batch`)."""
    batch = batches.collate(items)
    if augment is not None:
        batch = augment(batch)
    return transform(batch) if transform else batch


def collate_seeded(pairs, augment=None, transform=None):
    """The training loader's collate: (batch seed, item) pairs (SeededItems), collated and augmented with
    the global generators seeded by the batch's seed."""
    with seeded_rngs(pairs[0][0]):
        return collate_and_augment([item for _, item in pairs], augment, transform)


def seed_worker(worker_id):
    # DataLoader seeds torch in each worker from the loader's generator; numpy and random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loaders(cfg, train_set, val_set, augment=None, batch_transform=None):
    """(train_loader, val_loader); under torchrun each process loads its share of every global batch."""
    t = cfg.training
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if t.batch_size % world:
        raise ValueError(f"training.batch_size={t.batch_size} must be divisible by the {world} processes")
    per_process = t.batch_size // world
    order = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=t.shuffle, seed=cfg.seed)
    # a training set smaller than one batch still gives one (short) batch
    batch_sampler = EpochBatches(order, per_process, drop_last=len(train_set) // world >= per_process)
    loader_args = dict(num_workers=t.num_workers, pin_memory=t.get("pin_memory", False))
    if t.num_workers > 0:
        loader_args |= dict(worker_init_fn=seed_worker, persistent_workers=False)
    # The augmentation happens in the loader, so the doctor's probes see the same batches as training.
    train_loader = DataLoader(
        SeededItems(train_set),
        batch_sampler=batch_sampler,
        collate_fn=functools.partial(collate_seeded, augment=augment, transform=batch_transform),
        # the workers' base seed comes from this generator, not from the global one the checkpoint restores
        generator=torch.Generator().manual_seed(cfg.seed),
        **loader_args,
    )
    val_sampler = DistributedSampler(val_set, num_replicas=world, rank=rank, shuffle=False)
    val_collate = functools.partial(collate_and_augment, transform=batch_transform)
    val_loader = DataLoader(
        val_set, batch_size=per_process, sampler=val_sampler, collate_fn=val_collate, **loader_args
    )
    return train_loader, val_loader


def start_epoch(loader, epoch, batch, seed):
    """Point the training loader at `epoch`, from its batch number `batch` on (0: the whole epoch)."""
    loader.batch_sampler.sampler.set_epoch(epoch)
    loader.batch_sampler.start = batch
    # the workers' seeds (a dataset's own randomness, seed_worker) depend on the epoch only
    loader.generator.manual_seed(seed * 100_003 + epoch)
