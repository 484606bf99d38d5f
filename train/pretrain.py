"""Stage-1-style flow-matching training: the causal student's diffusion forcing (`pretrain.causal = True`) or the
bidirectional teacher (`pretrain.causal = False`); LoRA adapters or every DiT parameter (`train_params`).

python -m train.pretrain --config configs/pretrain_tiny.py --workdir DIR [--config.key=value ...]
"""

from liveavatar_jax.distill.trainer import main

if __name__ == "__main__":
    main("pretrain")
