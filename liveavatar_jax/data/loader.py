"""The training data loader: a grain `DataLoader` over a `liveavatar-train-v1` dataset folder (see format.py).

* Order: grain's `IndexSampler` shuffles the index positions with the configured seed and repeats forever (a new
  permutation per epoch); each JAX process reads its own shard (`ShardByJaxProcess`) and batches
  `global_batch / process_count` examples.
* Resuming: `DataIterator.get_state()` is grain's iterator state (a small JSON string) and goes into the checkpoint;
  `set_state` continues with exactly the examples the uninterrupted run would have read next.
* Malformed examples (unreadable file, shapes that differ from the spec, non-finite values): with
  `on_bad_example="raise"` the loader stops with an error naming the file; with `"skip"` it logs the file and the
  problem and uses the next well-formed example in index order instead, so batches stay full and the order stays
  deterministic. Every element carries `skipped`, the number of malformed files passed over to produce it; the trainer
  sums them into a running count.
Elements hold the five tensors (text zero-padded to `text_len`), `index` (position in index.json) and `skipped`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import grain
import jax
import numpy as np

from liveavatar_jax.data.format import FIELDS, DatasetError, ExampleSpec, read_example, read_index, validate

log = logging.getLogger(__name__)
BAD_EXAMPLE_POLICIES = ("skip", "raise")


class BadExampleError(DatasetError):
    """A malformed example met with `on_bad_example="raise"`."""


def check_spec(index_spec: dict, spec: ExampleSpec, where: str):
    stored = ExampleSpec.from_dict(index_spec)
    diff = {k: (getattr(stored, k), getattr(spec, k)) for k in spec.to_dict() if getattr(stored, k) != getattr(spec, k)}
    if diff:
        shown = ", ".join(f"{k}: dataset {a} vs config {b}" for k, (a, b) in sorted(diff.items()))
        raise DatasetError(f"{where}: the dataset was built for other shapes than the config asks for ({shown})")


class ExampleSource:
    """Random access to the examples of one dataset folder (a grain data source)."""

    def __init__(self, root, spec: ExampleSpec, *, on_bad_example: str = "skip", fields: Sequence[str] = FIELDS):
        if on_bad_example not in BAD_EXAMPLE_POLICIES:
            raise ValueError(f"on_bad_example must be one of {BAD_EXAMPLE_POLICIES}, got {on_bad_example!r}")
        self.root = Path(root)
        index = read_index(self.root)
        check_spec(index["spec"], spec, str(self.root / "index.json"))
        self.spec = spec
        self.files = [self.root / e["file"] for e in index["examples"]]
        self.on_bad_example = on_bad_example
        self.fields = tuple(fields)

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:  # part of grain's iterator state: must not depend on the process
        return f"ExampleSource(root={str(self.root)!r}, examples={len(self.files)}, fields={self.fields})"

    def problems(self, i: int) -> tuple[dict | None, list[str]]:
        try:
            arrays, _ = read_example(self.files[i])
        except DatasetError as e:
            return None, [str(e)]
        return arrays, validate(arrays, self.spec)

    def _element(self, arrays: dict, i: int, skipped: int) -> dict:
        out = {k: arrays[k] for k in self.fields if k != "text"}
        if "text" in self.fields:
            text = np.zeros((self.spec.text_len, self.spec.text_dim), np.float32)
            text[: arrays["text"].shape[0]] = arrays["text"]
            out["text"] = text
        out["index"] = np.int32(i)
        out["skipped"] = np.int32(skipped)
        return out

    def __getitem__(self, i: int) -> dict:
        n = len(self.files)
        for attempt in range(n):
            j = (int(i) + attempt) % n
            arrays, problems = self.problems(j)
            if not problems:
                return self._element(arrays, j, attempt)
            message = f"{self.files[j]}: malformed training example: " + "; ".join(problems)
            if self.on_bad_example == "raise":
                raise BadExampleError(message + " (set data.on_bad_example='skip' to pass over such files)")
            log.warning("%s (skipped)", message)
        raise DatasetError(f"{self.root}: no well-formed example in the dataset")


class DataIterator:
    """An endless iterator of host-local numpy batches whose position can be saved and restored."""

    def __init__(self, loader: grain.DataLoader):
        self._loader = loader
        self._it = iter(loader)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        return next(self._it)

    def get_state(self) -> str:
        return self._it.get_state().decode("utf-8")

    def set_state(self, state: str):
        self._it.set_state(state.encode("utf-8"))


def make_iterator(root, spec: ExampleSpec, *, global_batch: int, seed: int, shuffle: bool = True,
                  worker_count: int = 0, on_bad_example: str = "skip", fields: Sequence[str] = FIELDS,
                  process_index: int | None = None, process_count: int | None = None) -> DataIterator:
    """Batches of `global_batch / process_count` examples for this process."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} does not split over {process_count} processes")
    source = ExampleSource(root, spec, on_bad_example=on_bad_example, fields=fields)
    if len(source) < global_batch:
        raise DatasetError(f"{root}: {len(source)} examples are fewer than one batch of {global_batch}")
    if worker_count > 0:
        from absl import flags

        # grain's worker processes read absl flags; outside `absl.app.run` (tests, notebooks) use their defaults
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    shard = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count, drop_remainder=True)
    sampler = grain.samplers.IndexSampler(len(source), shard_options=shard, shuffle=shuffle, num_epochs=None,
                                          seed=seed)
    loader = grain.DataLoader(data_source=source, sampler=sampler,
                              operations=[grain.transforms.Batch(global_batch // process_count, drop_remainder=True)],
                              worker_count=worker_count)
    return DataIterator(loader)
