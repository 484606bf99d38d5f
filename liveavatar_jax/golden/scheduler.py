"""Golden kind `scheduler`: the flow-matching schedule and successive Euler updates with one fixed model output."""

from __future__ import annotations

import numpy as np

from liveavatar_jax.sampling.flow_match import euler_step, flow_match_schedule


def run(fixture) -> dict[str, np.ndarray]:
    manifest = fixture.manifest
    config = manifest.get("config", {})
    # The number of inference steps is not a config field; the manifest records the schedule it produced.
    num_steps = int(manifest.get("num_inference_steps", len(manifest["timesteps"])))
    schedule = flow_match_schedule(num_steps, shift=float(config.get("shift", 3.0)),
                                   num_train_timesteps=int(config.get("num_train_timesteps", 1000)))
    out = {"timesteps": schedule.timesteps, "sigmas": schedule.sigmas}
    x = fixture.inputs["sample"]
    v = fixture.inputs["model_output"]
    for i in range(schedule.num_steps):
        x = euler_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1])
        out[f"euler.step{i}.out"] = np.asarray(x)
    return out
