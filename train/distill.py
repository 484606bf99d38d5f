"""Stage 2: Self-Forcing DMD distillation with History Corrupt (student, critic, frozen teacher).

python -m train.distill --config configs/distill_tiny.py --workdir DIR [--config.key=value ...]
"""

from absl import app, flags
from ml_collections import config_flags

from liveavatar_jax.distill.trainer import DistillTrainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics.jsonl, tensorboard, exports")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    DistillTrainer(_CONFIG.value, _WORKDIR.value).fit()


if __name__ == "__main__":
    app.run(main)
