"""Stage 2: Self-Forcing DMD distillation with History Corrupt (student, critic, frozen teacher).

python -m train.distill --config configs/distill_tiny.py --workdir DIR [--config.key=value ...]
"""

from liveavatar_jax.distill.trainer import main

if __name__ == "__main__":
    main("distill")
