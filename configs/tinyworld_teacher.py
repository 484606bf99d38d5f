"""The tiny world's bidirectional teacher: flow matching from scratch, every DiT parameter trained.

The DiT is configs/tiny.py's (the embedded default of infer.stream), on 64x64 clips: latents 16 x 8 x 8 per frame
(the VAE's 8x spatial downsampling), patch 1x2x2 -> 16 tokens per latent frame, 6 latent frames (21 video frames).

python -m train.pretrain --config configs/tinyworld_teacher.py --workdir runs/teacher --config.data.path=DATASET
(DATASET: `python -m liveavatar_jax.tinyworld dataset ... -- --frames 6 --height 64 --width 64 --text_len 32 ...`)
"""

from configs import tiny
from liveavatar_jax.distill import config as defaults

FRAMES = 6          # latent frames per clip: two 3-frame blocks for the student stages


def get_config():
    c = defaults.pretrain(defaults.model_from(tiny.get_config().model), frames=FRAMES, height=8, width=8)
    c.train_params = "full"
    c.pretrain.causal = False           # whole clip attends to whole clip, one noise level per clip (Wan's teacher)
    c.pretrain.shift = 3.0              # the tiny stream samples on a shift-3 grid (configs/tiny.py stream.shift)
    # the text dropped (zeros) from 5 % of samples: Stage 2's null branch (`dmd.null_text="dropped"`) is then a text
    # the teacher knows, and its guidance sharpens the mouth without moving the colours as the unseen negative
    # prompt did (docs/tinyworld.md, "A null branch the teacher knows"; 5 % rather than 10 %: "A face that holds
    # in the pauses")
    c.pretrain.drop_text = 0.05
    # 8,000 steps (~10 min on 2 cores): on 48 training faces 4,000 were enough (600 left the mouth still), but on
    # the recipe's 192 faces a 4,000-step teacher's student follows the mouth less (sync 0.53 against 0.61,
    # docs/tinyworld.md)
    c.total_steps = 8000
    c.checkpoint_every = 1000
    c.log_every = 25
    c.tensorboard = False
    c.data.batch_size = 8
    c.optimizer.lr = 1e-3               # from scratch: the 14B LoRA rate (5e-5) would barely move a random net
    c.optimizer.weight_decay = 0.0
    c.ema.decay = 0.99
    c.ema.start_step = 100
    c.mesh.fsdp = 1
    return c
