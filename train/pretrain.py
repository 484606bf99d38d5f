"""Stage 1: diffusion-forcing pretraining of the causal student's LoRA.

python -m train.pretrain --config configs/pretrain_tiny.py --workdir DIR [--config.key=value ...]
"""

from absl import app, flags
from ml_collections import config_flags

from liveavatar_jax.distill.trainer import PretrainTrainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run folder: checkpoints, metrics.jsonl, tensorboard, exports")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    PretrainTrainer(_CONFIG.value, _WORKDIR.value).fit()


if __name__ == "__main__":
    app.run(main)
