"""The tiny world's causal student, Stage 1: diffusion forcing of every DiT parameter, starting from the teacher.

python -m train.pretrain --config configs/tinyworld_student.py --workdir runs/student \\
    --config.data.path=DATASET --config.model.checkpoint=runs/teacher
(model.checkpoint: the teacher's run folder, whose newest checkpoint's EMA seeds the student, or an exported
official safetensors file such as runs/teacher/dit_ema.safetensors.)
"""

from configs import tinyworld_teacher


def get_config():
    c = tinyworld_teacher.get_config()
    c.pretrain.causal = True            # block-causal attention, an independent noise level per 3-frame block
    c.pretrain.drop_text = 0.0          # the student is never guided; only the teacher needs the null text
    c.total_steps = 400
    c.checkpoint_every = 200
    c.optimizer.lr = 3e-4
    c.ema.start_step = 50
    return c
