"""One process of a multi-process TPP run (launched by test_multiprocess.py; also usable by hand).

    python tests/tpp_worker.py --coordinator_address 127.0.0.1:PORT --num_processes 2 --process_id I \
        --steps 2 --tensor 2 --blocks 8 --seed 11 --out DIR

`--noise` replays given block noise instead of drawing the seed's (what StreamEngine would draw): the caller has it
already, and the Gaussian sampler is slow to compile on CPU. Every process runs the same host loop over the global
mesh and writes DIR/process{I}.npz: the latents (every process holds every leaving block), the frames (only the
process owning the decode device) and, from process 0, the gathered step rings.
"""

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    p = argparse.ArgumentParser()
    from liveavatar_jax.parallel import distributed
    distributed.add_arguments(p)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--tensor", type=int, default=1)
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--decode_on", default="last_stage")
    p.add_argument("--noise", default=None, help=".npy of per-block noise [N, 1, 16, 3, h, w] (default: the seed's)")
    p.add_argument("--out", required=True)
    args = p.parse_args()

    cfg = distributed.initialize_from_args(args, initialization_timeout=60)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils

    from liveavatar_jax.golden import Fixture
    from liveavatar_jax.golden.dit import load_fixture_model
    from liveavatar_jax.parallel.mesh import make_tpp_mesh
    from liveavatar_jax.parallel.tpp import LinearPreviewDecoder, TPPEngine
    from liveavatar_jax.streaming.engine import StreamConfig, StreamContext, split_audio_blocks

    golden = REPO.parent / "shared" / "golden"
    model_cfg, model = load_fixture_model(Fixture.open(golden / "dit_s2v_causal"))
    inp = Fixture.open(golden / "stream_loop").inputs
    ctx = StreamContext(text=model.embed_text(jnp.asarray(inp["context"])[None]),
                        ref_latents=jnp.asarray(inp["ref_latents"]), motion_latents=jnp.asarray(inp["motion_latents"]))
    audio = split_audio_blocks(jnp.asarray(inp["audio_emb"]), 3, 0, args.blocks)

    mesh = make_tpp_mesh(args.steps, tensor=args.tensor)
    engine = TPPEngine(model, StreamConfig(steps=args.steps, ring_blocks=4, sink_replace_block=4), mesh=mesh,
                       decoder=LinearPreviewDecoder(), decode_on=args.decode_on)
    ctx = engine.with_text_kv(ctx)
    state = engine.init(ctx, args.seed)
    noise = None if args.noise is None else np.load(args.noise)
    state, out = engine.run(state, ctx, audio, noise=noise)

    result = {"latents": np.asarray(out["latents"]), "blocks": out["blocks"],
              "stage_processes": np.asarray([d.process_index for d in mesh.devices[:, 0]]),
              "num_processes": np.asarray(jax.process_count())}
    if out["frames"] is not None:
        result["frames"] = np.asarray(out["frames"])
    rings_k = multihost_utils.process_allgather(state.rings.k, tiled=True)
    if cfg.process_id == 0:
        result["rings_k"] = np.asarray(rings_k)
    np.savez(os.path.join(args.out, f"process{cfg.process_id}.npz"), **result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
