"""Orbax checkpoints of a training run (training.md 8.6, jax_notes.md 6).

WORKDIR/checkpoints/<step>/ holds one item per state part (adapters, EMA, optimizer states: `StandardSave`) and a
`meta` item (`JsonSave`): the step, the run's RNG key data, the data loader position, the count of skipped examples
and the full ml-collections config. The frozen base is never saved.

* Saves are asynchronous (the step loop continues while arrays are written); `max_to_keep` keeps the newest N.
* Restore targets come from the caller as abstract arrays carrying the *current* mesh's shardings, so a checkpoint
  written on one mesh restores onto another.
* Resuming under a different config stops with the list of differing keys (`ConfigMismatchError`); keys that only
  steer the run's length, logging or layout (`RESUME_FREE_KEYS`) may change.
* A checkpoint that cannot be read (corrupt or partly deleted files) is reported, set aside (deleted, so that the
  resumed run can write that step again) and the next older one is tried.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import orbax.checkpoint as ocp

log = logging.getLogger("liveavatar_jax.train")

# Keys that may differ between a checkpoint's config and the resuming run's config (dotted prefixes).
# (Not data.worker_count: grain's saved iterator position is only valid for the same number of workers.)
RESUME_FREE_KEYS = ("total_steps", "checkpoint_every", "keep_checkpoints", "async_checkpointing", "log_every",
                    "tensorboard", "mesh", "compilation_cache", "export_lora")


class ConfigMismatchError(ValueError):
    """The workdir holds a checkpoint of a different config."""


class NoUsableCheckpointError(RuntimeError):
    """Every checkpoint in the directory failed to restore."""


def flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: Mapping, current: Mapping, free: Sequence[str] = RESUME_FREE_KEYS) -> list[str]:
    """'key: saved -> current' for every differing key not under a resume-free prefix."""
    a = flatten(json.loads(json.dumps(saved)))
    b = flatten(json.loads(json.dumps(current)))

    def is_free(key):
        return any(key == p or key.startswith(p + ".") for p in free)

    diffs = []
    for key in sorted(set(a) | set(b)):
        if is_free(key):
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            diffs.append(f"{key}: {va!r} -> {vb!r}")
    return diffs


class Checkpointer:
    def __init__(self, directory, item_names: Sequence[str], *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.item_names = tuple(item_names)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, item_names=(*self.item_names, "meta"), options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, items: Mapping[str, object], meta: Mapping):
        if set(items) != set(self.item_names):
            raise ValueError(f"checkpoint items {sorted(items)} differ from {sorted(self.item_names)}")
        if step in self.steps():
            return
        args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
        self.manager.save(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonSave(dict(meta))), force=True)

    def read_meta(self, step: int) -> dict:
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"])

    def restore_latest(self, abstract_items: Mapping[str, object], config: Mapping | None = None):
        """(step, items, meta) of the newest checkpoint that restores, or None when there is none.

        With `config`, the newest readable checkpoint's config must match it (`ConfigMismatchError` otherwise).
        """
        steps = self.steps()
        if not steps:
            return None
        failures = []
        for step in reversed(steps):
            try:
                meta = self.read_meta(step)
                if config is not None and "config" in meta:
                    diffs = config_differences(meta["config"], config)
                    if diffs:
                        raise ConfigMismatchError(
                            f"{self.directory} holds a checkpoint (step {step}) of a different config; differing "
                            "keys:\n  " + "\n  ".join(diffs) + "\nUse a new --workdir, or restore the config.")
                args = {k: ocp.args.StandardRestore(v) for k, v in abstract_items.items()}
                out = self.manager.restore(step, args=ocp.args.Composite(**args))
            except ConfigMismatchError:
                raise
            except Exception as e:  # any read failure: damaged files, missing items, truncated arrays
                reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                failures.append(f"step {step}: {reason}")
                log.warning("checkpoint %s/%d cannot be restored (%s); falling back to the previous checkpoint",
                            self.directory, step, reason)
                continue
            for bad in [s for s in steps if s > step]:
                log.warning("removing unreadable checkpoint %s/%d", self.directory, bad)
                self.manager.delete(bad)
            return step, {k: out[k] for k in abstract_items}, meta
        raise NoUsableCheckpointError(f"{self.directory}: no checkpoint could be restored:\n  " + "\n  ".join(failures))

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
