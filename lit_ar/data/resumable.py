"""A training data order that survives interruption: resume part-way through an epoch without repeating or
skipping a sample.

`ResumableSampler` is the DistributedSampler the datamodule always used (so N processes see exactly what one
process sees), plus a start offset and (index, epoch) keys. `ResumableDataLoader` counts the batches it has handed
out; Lightning saves its `state_dict()` in every checkpoint (`loops.fit_loop.combined_loader`) and, on a mid-epoch
`--ckpt_path` resume, calls `load_state_dict()` before the first batch, so the epoch continues where it stopped.
"""

import itertools
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """DistributedSampler yielding `(index, epoch)` that can skip the first `start` samples of its shard.

    The epoch travels with the index so that the dataset can seed each sample's augmentation from
    (seed, epoch, index): the same crop and flip whether a sample is drawn by 1 or N processes, by 0 or 8 workers,
    before or after a resume.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0  # samples of this rank's shard to skip, in the next iteration only

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self.start, epoch = self.start, 0, self.epoch
        for index in itertools.islice(super().__iter__(), start, None):
            yield index, epoch


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position in the epoch (epoch, batches handed out) is saved and restored by Lightning.

    The count is of batches yielded to the training loop, which Lightning's own progress counters match at every
    point it saves (after a batch, at an epoch end, on a signal); worker prefetching does not affect it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._epoch, self._batches = 0, 0
        self._pending: dict[str, Any] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs until the first batch is asked for, after Lightning has set the sampler's epoch
        # and loaded our state, so worker processes never prefetch from the wrong place.
        epoch = getattr(self.sampler, "epoch", 0)
        start = 0
        if self._pending is not None and self._pending["epoch"] == epoch:
            start = self._pending["batches"]
        self._pending = None
        self._epoch, self._batches = epoch, start
        if isinstance(self.sampler, ResumableSampler):  # before super().__iter__: worker iterators prefetch at once
            self.sampler.start = start * self.batch_size
            batches = super().__iter__()
        else:  # e.g. Lightning swapped in its own sampler (overfit_batches): skip by drawing
            batches = itertools.islice(super().__iter__(), start, None)
        for batch in batches:
            self._batches += 1
            yield batch

    def _samples_per_batch(self) -> int:
        return self.batch_size * getattr(self.sampler, "num_replicas", 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "batches": self._batches,
            "batches_per_epoch": len(self),
            "samples_per_batch": self._samples_per_batch(),  # the global batch: per device x devices
            "dataset_size": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mid_epoch = 0 < state["batches"] < state["batches_per_epoch"]
        if mid_epoch and state["dataset_size"] != len(self.dataset):
            raise ValueError(
                f"cannot resume mid-epoch: the training set had {state['dataset_size']} samples when the checkpoint "
                f"was saved and has {len(self.dataset)} now (changed `data.*` settings?). Keep the data as it was, or "
                "resume from an end-of-epoch checkpoint."
            )
        if mid_epoch and state["samples_per_batch"] != self._samples_per_batch():
            raise ValueError(
                f"cannot resume mid-epoch: the global batch was {state['samples_per_batch']} samples when the "
                f"checkpoint was saved and is {self._samples_per_batch()} now ({self.batch_size} per device x "
                f"{getattr(self.sampler, 'num_replicas', 1)} devices). Keep `data.batch_size` x devices (or "
                "`data.global_batch_size`) as it was; the number of devices may change."
            )
        self._pending = dict(state)
