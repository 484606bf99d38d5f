"""Training metrics: one JSON object per line in WORKDIR/metrics.jsonl, TensorBoard event files, console lines.

On resume the JSON log is cut back to the restored step (a killed run may have logged steps its checkpoint does not
hold), and TensorBoard is told to purge later events, so a resumed run's logs read like an uninterrupted run's.
Only process 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

log = logging.getLogger("liveavatar_jax.train")
METRICS_FILE = "metrics.jsonl"


def to_python(value):
    a = np.asarray(value)
    if a.ndim:
        return a.tolist()
    if np.issubdtype(a.dtype, np.integer):
        return int(a)
    return float(a)


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Keeps the lines with step <= last_step (and drops a torn last line); returns how many were kept."""
    if not path.is_file():
        return 0
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if int(row.get("step", -1)) <= last_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)
    return len(kept)


def _fmt_seconds(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


class MetricsLogger:
    def __init__(self, workdir, total_steps: int, start_step: int = 0, *, log_every: int = 1,
                 tensorboard: bool = True, headline=("loss",)):
        self.is_main = jax.process_index() == 0
        self.workdir = Path(workdir)
        self.total = int(total_steps)
        self.log_every = max(1, int(log_every))
        self.headline = tuple(headline)
        self.path = self.workdir / METRICS_FILE
        self._writer = None
        self._t_last = time.perf_counter()
        self._step_last = start_step
        self._start = start_step
        if not self.is_main:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, start_step)
        self._file = open(self.path, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=start_step + 1)

    def write(self, step: int, metrics: Mapping[str, object]):
        """Logs the metrics of `step` (the number of completed steps)."""
        if not self.is_main:
            return
        row = {"step": int(step), **{k: to_python(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self._writer.add_scalar(k, v, step)
        if step % self.log_every == 0 or step == self.total:
            now = time.perf_counter()
            per_step = (now - self._t_last) / max(step - self._step_last, 1)
            self._t_last, self._step_last = now, step
            parts = [f"{k} {row[k]:.5g}" for k in self.headline if isinstance(row.get(k), float)]
            extra = [f"{k} {row[k]:.4g}" for k in ("grad_norm", "gen/grad_norm", "critic/grad_norm", "tokens_per_s")
                     if isinstance(row.get(k), (int, float))]
            pct = 100.0 * step / max(self.total, 1)
            log.info("[%d/%d %.0f%%] %s | %.3f s/step | eta %s", step, self.total, pct, " | ".join(parts + extra),
                     per_step, _fmt_seconds(per_step * (self.total - step)))

    def close(self):
        if not self.is_main:
            return
        self._file.close()
        if self._writer is not None:
            self._writer.close()
