"""The training loader (loaders.py): every batch's random numbers come from (seed, epoch, rank, batch number),
so they do not depend on the worker count or on how many batches a resumed epoch skips."""

import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from {{ cookiecutter.package_name }} import loaders


class Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 22

    def __getitem__(self, i):
        return {"x": torch.tensor([float(i)])}


def noisy(batch):
    """An augmentation that draws from all three global generators: x + noise, noise in [0, 0.03)."""
    n = len(batch["x"])
    noise = torch.rand(n, 1) + torch.from_numpy(np.random.rand(n, 1)).float() + random.random()
    return batch | {"x": batch["x"] + 0.01 * noise}


def cfg(workers, batch_size=4, shuffle=True):
    return OmegaConf.create(
        {"seed": 3, "training": {"batch_size": batch_size, "shuffle": shuffle, "num_workers": workers}}
    )


def epoch_batches(workers, epoch, start=0):
    train_loader, _ = loaders.build_loaders(cfg(workers), Numbers(), Numbers(), augment=noisy)
    loaders.start_epoch(train_loader, epoch, start, seed=3)
    return [batch["x"] for batch in train_loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_do_not_depend_on_workers_or_on_the_batches_skipped(workers):
    whole = epoch_batches(0, epoch=1)
    assert len(whole) == 5  # 22 // 4, the short last batch dropped
    for start in (0, 2):
        resumed = epoch_batches(workers, epoch=1, start=start)
        assert len(resumed) == len(whole) - start
        for a, b in zip(whole[start:], resumed, strict=True):
            assert torch.equal(a, b)


def test_each_batch_and_each_epoch_draws_its_own_numbers():
    noise = [x - x.round() for x in epoch_batches(0, epoch=0) + epoch_batches(0, epoch=1)]
    firsts = [float(n[0]) for n in noise]
    assert len(set(firsts)) == len(firsts), firsts  # no two batches share a stream


def test_the_augmentation_leaves_the_global_generators_as_they_were():
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    expected = torch.rand(1).item(), np.random.rand(), random.random()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    epoch_batches(0, epoch=0)
    assert (torch.rand(1).item(), np.random.rand(), random.random()) == expected


def test_batch_size_not_divisible_by_the_processes_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 3)
    with pytest.raises(ValueError, match="training.batch_size=4 must be divisible by the 3 processes"):
        loaders.build_loaders(cfg(0), Numbers(), Numbers())
