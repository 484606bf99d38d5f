"""Colour science the tiny world and its metrics share: sRGB -> CIE L*a*b* (D65) and the CIE colour differences.

`delta_e_cie76` is the plain Euclidean distance in L*a*b* (used for segmentation thresholds and for keeping the
world's colours apart); `delta_e_ciede2000` is the CIE 2000 formula (Sharma, Wu and Dalal 2005, with kL = kC = kH = 1),
the figure `liveavatar_jax.eval` reports as drift.
"""

from __future__ import annotations

import numpy as np

# D65 reference white of sRGB, in XYZ with Y = 1
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883])
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
_EPSILON = 216 / 24389      # CIE's (6/29)^3: below it L* is linear in Y
_KAPPA = 24389 / 27


def srgb_to_linear(rgb) -> np.ndarray:
    """sRGB values in [0, 1] -> linear light (the IEC 61966-2-1 transfer function)."""
    c = np.asarray(rgb, np.float64)
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def srgb_to_lab(rgb) -> np.ndarray:
    """[..., 3] sRGB in [0, 1] (D65) -> [..., 3] CIE L*a*b* (L* in 0..100)."""
    xyz = srgb_to_linear(rgb) @ _RGB_TO_XYZ.T / _WHITE_D65
    f = np.where(xyz > _EPSILON, np.cbrt(xyz), (_KAPPA * xyz + 16) / 116)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def srgb8_to_lab(rgb8) -> np.ndarray:
    """[..., 3] uint8 sRGB -> [..., 3] L*a*b*."""
    return srgb_to_lab(np.asarray(rgb8, np.float64) / 255.0)


def delta_e_cie76(lab1, lab2) -> np.ndarray:
    """CIE 1976 colour difference: Euclidean distance in L*a*b*."""
    return np.linalg.norm(np.asarray(lab1, np.float64) - np.asarray(lab2, np.float64), axis=-1)


def delta_e_ciede2000(lab1, lab2) -> np.ndarray:
    """CIEDE2000 colour difference of [..., 3] L*a*b* arrays (broadcasting), kL = kC = kH = 1."""
    lab1 = np.asarray(lab1, np.float64)
    lab2 = np.asarray(lab2, np.float64)
    l1, a1, b1 = lab1[..., 0], lab1[..., 1], lab1[..., 2]
    l2, a2, b2 = lab2[..., 0], lab2[..., 1], lab2[..., 2]

    c_mean = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    # a* is stretched for near-neutral colours, where the 1976 space is least uniform
    g = 0.5 * (1 - np.sqrt(c_mean ** 7 / (c_mean ** 7 + 25.0 ** 7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360

    dl = l2 - l1
    dc = c2p - c1p
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(c1p * c2p == 0, 0.0, dh)
    dh_big = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))

    l_mean = (l1 + l2) / 2
    cp_mean = (c1p + c2p) / 2
    h_sum = h1p + h2p
    h_mean = np.where(np.abs(h1p - h2p) <= 180, h_sum / 2,
                      np.where(h_sum < 360, (h_sum + 360) / 2, (h_sum - 360) / 2))
    h_mean = np.where(c1p * c2p == 0, h_sum, h_mean)

    t = (1 - 0.17 * np.cos(np.radians(h_mean - 30)) + 0.24 * np.cos(np.radians(2 * h_mean))
         + 0.32 * np.cos(np.radians(3 * h_mean + 6)) - 0.20 * np.cos(np.radians(4 * h_mean - 63)))
    d_theta = 30 * np.exp(-(((h_mean - 275) / 25) ** 2))
    r_c = 2 * np.sqrt(cp_mean ** 7 / (cp_mean ** 7 + 25.0 ** 7))
    s_l = 1 + 0.015 * (l_mean - 50) ** 2 / np.sqrt(20 + (l_mean - 50) ** 2)
    s_c = 1 + 0.045 * cp_mean
    s_h = 1 + 0.015 * cp_mean * t
    r_t = -np.sin(np.radians(2 * d_theta)) * r_c
    return np.sqrt((dl / s_l) ** 2 + (dc / s_c) ** 2 + (dh_big / s_h) ** 2
                   + r_t * (dc / s_c) * (dh_big / s_h))
