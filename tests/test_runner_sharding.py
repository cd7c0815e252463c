"""The global batch split over processes and accumulation steps, and the learning-rate schedule."""
from __future__ import annotations

import itertools
import math
import pickle

import pytest
import torch

from ctok.training.schedule import lr_factor
from ctok.training.sharding import BatchRandom, BatchSplit, GlobalBatchSampler


def micro_batches(n, global_batch, accum, world, rank, steps, start=0):
    sampler = GlobalBatchSampler(n, BatchSplit(global_batch, accum, world, rank), seed=3, start_step=start)
    return list(itertools.islice(iter(sampler), steps * accum))


@pytest.mark.parametrize("accum, world", [(1, 2), (2, 1), (2, 2), (4, 1)])
def test_every_split_of_a_step_covers_the_same_samples_in_the_same_order(accum, world):
    whole = micro_batches(50, 8, 1, 1, 0, steps=9)
    parts = [micro_batches(50, 8, accum, world, rank, steps=9) for rank in range(world)]
    for step in range(9):
        # micro-step k of rank r holds rows [k * 8/accum + r * b, ...) of the step's global batch
        rows = [parts[r][step * accum + k] for k in range(accum) for r in range(world)]
        assert sum(rows, []) == whole[step]


def test_each_epoch_is_a_permutation_and_epochs_differ():
    steps = micro_batches(48, 8, 1, 1, 0, steps=12)  # 6 steps per epoch
    first, second = sum(steps[:6], []), sum(steps[6:], [])
    assert sorted(first) == sorted(second) == list(range(48))
    assert first != second


def test_the_tail_that_does_not_fill_a_global_batch_is_dropped():
    steps = micro_batches(21, 8, 1, 1, 0, steps=2)
    assert len(set(sum(steps, []))) == 16


def test_sampler_resumes_at_any_step():
    straight = micro_batches(50, 8, 2, 2, 1, steps=15)
    resumed = micro_batches(50, 8, 2, 2, 1, steps=8, start=7)
    assert resumed == straight[14:]
    sampler = GlobalBatchSampler(50, BatchSplit(8, 1, 1, 0), seed=3)
    assert sampler.state(13) == {"seed": 3, "epoch": 2, "position": 1, "global_batch": 8, "dataset_size": 50}


def test_sampler_and_split_reject_impossible_sizes():
    with pytest.raises(ValueError, match="fewer than one global batch of 8"):
        GlobalBatchSampler(5, BatchSplit(8, 1, 1, 0), seed=0)
    with pytest.raises(ValueError, match="global batch 10 must be divisible by grad_accum x processes = 2 x 2 = 4"):
        BatchSplit(10, 2, 2, 0)


@pytest.mark.parametrize("accum, world", [(1, 2), (2, 1), (2, 4)])
def test_per_sample_random_numbers_do_not_depend_on_the_split(accum, world):
    def draws(split, micro):
        rng = BatchRandom(5, step=11, split=split, micro_step=micro, device=torch.device("cpu"))
        return torch.cat([rng.randn(3, 2).flatten(1), rng.rand(1), rng.randint(1000, 1).float()], dim=1)

    whole = draws(BatchSplit(16, 1, 1, 0), 0)
    for rank in range(world):
        split = BatchSplit(16, accum, world, rank)
        for micro in range(accum):
            rows = slice(split.offset(micro), split.offset(micro) + split.micro_batch)
            assert torch.equal(draws(split, micro), whole[rows])
    # successive draws and steps give new numbers
    other_step = BatchRandom(5, 12, BatchSplit(16, 1, 1, 0), 0, torch.device("cpu")).randn(3, 2)
    assert not torch.equal(other_step.flatten(1), whole[:, :6])
    assert not torch.equal(whole[:, 0:2], whole[:, 2:4])


def test_lr_warmup_then_cosine_or_constant():
    cosine = [lr_factor(s, schedule="cosine", warmup_steps=4, total_steps=14, min_ratio=0.1) for s in range(15)]
    assert cosine[:4] == [0.25, 0.5, 0.75, 1.0]
    assert cosine[4] == 1.0
    assert cosine[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cosine[4:], cosine[5:]))
    assert [lr_factor(s, schedule="constant", warmup_steps=2, total_steps=9) for s in (0, 1, 2, 8)] == [0.5, 1, 1, 1]
    with pytest.raises(ValueError, match="'constant' or 'cosine', got 'linear'"):
        lr_factor(0, schedule="linear", warmup_steps=0, total_steps=1)


def test_each_index_carries_the_seed_of_its_run_epoch_and_sample_whatever_the_split():
    def seeds(accum, world, steps, start=0, run_seed=3):
        found = {}
        for rank in range(world):
            sampler = GlobalBatchSampler(48, BatchSplit(8, accum, world, rank), seed=run_seed, start_step=start)
            for k, batch in enumerate(itertools.islice(iter(sampler), steps * accum)):
                epoch = (start + k // accum) // 6  # 48 // 8 = 6 steps per epoch
                found.update({(epoch, int(i)): i.seed for i in batch})
        return found

    whole = seeds(1, 1, steps=12)
    assert len(whole) == 96 and all(isinstance(s, int) for s in whole.values())
    resumed_split = seeds(2, 2, steps=5, start=7)  # a run resumed at step 7 on 2 processes x 2 accumulations
    assert len(resumed_split) == 40 and all(whole[key] == s for key, s in resumed_split.items())
    assert all(whole[(0, i)] != whole[(1, i)] for i in range(48))  # the next epoch crops anew
    assert not set(whole.values()) & set(seeds(1, 1, steps=12, run_seed=4).values())
    index = micro_batches(48, 8, 1, 1, 0, steps=1)[0][0]
    assert pickle.loads(pickle.dumps(index)).seed == index.seed  # as it reaches a DataLoader worker
