"""The distilled flow-matching schedule and the Euler update (architecture.md section 4)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from conftest import golden_dir
from liveavatar_jax.golden import run_fixture
from liveavatar_jax.sampling.flow_match import euler_step, flow_match_schedule


def test_golden_scheduler():
    _, rows = run_fixture(golden_dir("scheduler"))
    assert rows and all(r.ok for r in rows), "\n".join(r.line() for r in rows)


def test_four_steps_official_values():
    s = flow_match_schedule(4)
    assert s.timesteps.dtype == np.float32 and s.sigmas.dtype == np.float32
    np.testing.assert_array_equal(s.timesteps, np.float32([1000.0, 857.6923217773438, 602.1505737304688,
                                                           8.928571701049805]))
    np.testing.assert_array_equal(s.sigmas, np.float32([1.0, 0.857692301273346, 0.602150559425354,
                                                        0.008928571827709675, 0.0]))


@pytest.mark.parametrize("steps,expected", [(3, [1000.0, 751.1, 8.9]), (2, [1000.0, 8.9])])
def test_fewer_steps(steps, expected):
    s = flow_match_schedule(steps)
    assert s.num_steps == steps and s.sigmas.shape == (steps + 1,) and s.sigmas[-1] == 0
    np.testing.assert_allclose(s.timesteps, expected, atol=0.05)
    np.testing.assert_array_equal(s.timesteps, (s.sigmas[:-1] * np.float32(1000)).astype(np.float32))


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 50])
def test_shift_applied_twice(steps):
    """Closed form of section 4: sigma = 3s/(1+2s), s = linspace(1, s_min, n), s_min = shift(1/1000)."""
    s_min = 3 * 0.001 / (1 + 2 * 0.001)
    s = np.linspace(1.0, s_min, steps)
    expected = 3 * s / (1 + 2 * s)
    got = flow_match_schedule(steps)
    np.testing.assert_allclose(got.sigmas[:-1], expected, rtol=1e-6)
    assert np.all(np.diff(got.sigmas) < 0)


def test_bad_step_count():
    with pytest.raises(ValueError, match="num_steps"):
        flow_match_schedule(0)


def _random(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_euler_fp32_is_plain_update():
    x, v = _random((4, 33), 0), _random((4, 33), 1)
    s = flow_match_schedule(4)
    for i in range(4):
        dt = np.float32(s.sigmas[i + 1] - s.sigmas[i])
        got = np.asarray(euler_step(x, v, s.sigmas[i], s.sigmas[i + 1]))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, x + dt * v)


def test_euler_bf16_rounds_the_product_then_the_sum():
    bf16 = ml_dtypes.bfloat16
    x = _random((64, 64), 2).astype(bf16)
    v = _random((64, 64), 3).astype(bf16)
    s = flow_match_schedule(4)
    sigma, sigma_next = s.sigmas[1], s.sigmas[2]
    got = np.asarray(euler_step(jnp.asarray(x), jnp.asarray(v), sigma, sigma_next))
    assert got.dtype == bf16
    dt = np.float32(sigma_next - sigma)
    product = (dt * v.astype(np.float32)).astype(bf16)
    expected = (x.astype(np.float32) + product.astype(np.float32)).astype(bf16)
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))
    # The intermediate bf16 rounding is visible: a single rounding of the fp32 update differs somewhere.
    single = (x.astype(np.float32) + dt * v.astype(np.float32)).astype(bf16)
    assert np.any(single.view(np.uint16) != expected.view(np.uint16))


def test_euler_jits_with_traced_sigmas():
    s = flow_match_schedule(4)
    x, v = _random((8,), 4), _random((8,), 5)
    step = jax.jit(euler_step)
    for i in range(4):
        np.testing.assert_array_equal(np.asarray(step(x, v, s.sigmas[i], s.sigmas[i + 1])),
                                      np.asarray(euler_step(x, v, s.sigmas[i], s.sigmas[i + 1])))
