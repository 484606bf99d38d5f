"""Faces of the tiny world: random colours and proportions from a seed, drawn in numpy with anti-aliasing.

A face is a `FaceParams` (colours in sRGB, geometry in fractions of the image height so that one face can be drawn
at any size). `sample_face(seed)` draws one from the world's distribution; `draw_face(params, opening, sway, blink)`
renders it with the mouth `opening` in [0, 1], the head shifted by `sway` (fractions of the height) and the eyelids
closed by `blink` in [0, 1]. `reference_face(params)` is the face at rest (mouth closed, eyes open, no sway): the
picture `python -m liveavatar_jax.tinyworld face` writes and the reference image of the world's clips.

What the metrics rely on (`liveavatar_jax.eval`, docs/tinyworld.md), enforced when sampling:
  * the mouth interior is `MOUTH_INTERIOR` (luma 20 of 255); skin and lips have luma >= `MIN_FACE_LUMA` (100),
    so dark pixels in the mouth region are the open mouth and nothing else (luma: `luma601`);
  * skin, hair, background, lips and eye whites are at least `MIN_COLOUR_GAP` (CIE76) apart from the skin, and the
    hair and background at least that far apart from each other, so the regions can be found by colour;
  * the head sways by at most `MAX_SWAY` of the height, and the open mouth stays inside the face.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from liveavatar_jax.tinyworld.colour import delta_e_cie76, srgb8_to_lab

DEFAULT_SIZE = 64
SUPERSAMPLE = 4
MOUTH_INTERIOR = (40, 12, 18)
EYE_WHITE = (240, 240, 232)
MIN_COLOUR_GAP = 22.0
MIN_FACE_LUMA = 100.0
MAX_SWAY = 0.022                    # of the image height, per axis

# skin tones from pale to deep; a face mixes two neighbours and adds a little jitter
_SKIN_TONES = np.array([[246, 222, 204], [238, 200, 172], [224, 176, 140], [200, 148, 110], [176, 122, 86],
                        [150, 102, 72]], np.float64)
_HAIR_TONES = np.array([[28, 22, 20], [70, 42, 26], [120, 80, 44], [205, 170, 110], [150, 60, 30],
                        [170, 170, 172]], np.float64)


@dataclasses.dataclass(frozen=True)
class FaceParams:
    """One face. Colours are sRGB uint8 triples; lengths are fractions of the image height, x measured from the
    image centre, y from the top."""
    skin: tuple
    hair: tuple
    background: tuple
    lips: tuple
    iris: tuple
    centre_y: float           # face ellipse centre
    centre_x: float           # offset from the image centre
    face_rx: float
    face_ry: float
    eye_y: float              # below the face centre (negative: above)
    eye_dx: float             # half the distance between the eyes
    eye_rx: float
    brow_gap: float           # from the top of the eye to the brow
    mouth_y: float            # below the face centre
    mouth_rx: float
    lip: float                # lip thickness
    mouth_open: float         # interior half-height at opening 1
    fringe_y: float           # hair covers the face above this line (from the top)
    hair_rx: float
    hair_ry: float
    long_hair: float          # 0 for short hair, else how far below the face centre the hair reaches

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "FaceParams":
        return cls(**{f.name: (tuple(int(c) for c in d[f.name]) if isinstance(d[f.name], (list, tuple))
                               else float(d[f.name])) for f in dataclasses.fields(cls)})


def _rgb8(x) -> tuple:
    return tuple(int(round(c)) for c in np.clip(x, 0, 255))


def _gap(c1, c2) -> float:
    return float(delta_e_cie76(srgb8_to_lab(c1), srgb8_to_lab(c2)))


def _lightness(c) -> float:
    return float(srgb8_to_lab(c)[0])


def luma601(rgb) -> np.ndarray:
    """BT.601 luma of sRGB code values (0-255): the Y' an H.264 encoder stores."""
    rgb = np.asarray(rgb, np.float64)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _sample_colours(rng: np.random.Generator) -> dict:
    for _ in range(1000):
        i = rng.integers(len(_SKIN_TONES) - 1)
        skin = _rgb8(_SKIN_TONES[i] + rng.random() * (_SKIN_TONES[i + 1] - _SKIN_TONES[i]) + rng.normal(0, 6, 3))
        if rng.random() < 0.2:              # dyed hair
            hair = _rgb8(rng.uniform(20, 230, 3))
        else:
            hair = _rgb8(_HAIR_TONES[rng.integers(len(_HAIR_TONES))] + rng.normal(0, 10, 3))
        background = _rgb8(rng.uniform(0, 255, 3))
        red = np.array([185.0, 55.0, 70.0])
        lips = _rgb8(np.asarray(skin) + rng.uniform(0.45, 0.75) * (red - np.asarray(skin)))
        iris = _rgb8(rng.choice([[40, 28, 20], [60, 40, 25], [40, 60, 90], [50, 70, 45]]) + rng.normal(0, 5, 3))
        lightness_ok = (50 <= _lightness(skin) <= 86 and _lightness(iris) < 35
                        and min(luma601(skin), luma601(lips)) >= MIN_FACE_LUMA)
        gaps_ok = (min(_gap(skin, hair), _gap(skin, background), _gap(skin, lips), _gap(skin, EYE_WHITE),
                       _gap(hair, background)) >= MIN_COLOUR_GAP)
        if lightness_ok and gaps_ok:
            return dict(skin=skin, hair=hair, background=background, lips=lips, iris=iris)
    raise RuntimeError("could not sample face colours that satisfy the world's constraints")


def sample_face(seed: int) -> FaceParams:
    """The face of `seed`: the same parameters on every machine (numpy PCG64)."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xFACE]))
    colours = _sample_colours(rng)
    face_ry = rng.uniform(0.30, 0.36)
    face_rx = face_ry * rng.uniform(0.75, 0.9)
    centre_y = rng.uniform(0.52, 0.57)
    eye_rx = face_rx * rng.uniform(0.13, 0.19)
    eye_y = -face_ry * rng.uniform(0.0, 0.2)
    brow_gap = face_ry * rng.uniform(0.06, 0.12)
    brow_top = centre_y + eye_y - 0.7 * eye_rx - brow_gap - 0.3 * eye_rx
    fringe_y = min(centre_y - face_ry * rng.uniform(0.45, 0.75), brow_top - 0.04)
    mouth_rx = face_rx * rng.uniform(0.3, 0.42)
    return FaceParams(
        **colours, centre_y=centre_y, centre_x=rng.uniform(-0.02, 0.02), face_rx=face_rx, face_ry=face_ry,
        eye_y=eye_y, eye_dx=face_rx * rng.uniform(0.35, 0.5), eye_rx=eye_rx, brow_gap=brow_gap,
        mouth_y=face_ry * rng.uniform(0.45, 0.55), mouth_rx=mouth_rx, lip=mouth_rx * rng.uniform(0.14, 0.22),
        mouth_open=mouth_rx * rng.uniform(0.65, 0.85), fringe_y=fringe_y,
        hair_rx=face_rx * rng.uniform(1.05, 1.2), hair_ry=face_ry * rng.uniform(0.95, 1.1),
        long_hair=float(face_ry * rng.uniform(0.6, 1.1)) if rng.random() < 0.4 else 0.0)


class _Canvas:
    """A supersampled RGB canvas in pixel coordinates of the output image (pixel j spans [j, j + 1)).

    Shapes are evaluated only inside a window around them (`window`), which keeps a frame to a few milliseconds.
    """

    def __init__(self, height: int, width: int, background, supersample: int):
        self.h, self.w, self.ss = height, width, supersample
        self.rgb = np.empty((height * supersample, width * supersample, 3), np.float32)
        self.rgb[:] = np.asarray(background, np.float32)

    def window(self, top: float, bottom: float, left: float, right: float) -> "_Window":
        s = self.ss
        r0, r1 = max(0, int(np.floor(top * s))), min(self.h * s, int(np.ceil(bottom * s)) + 1)
        c0, c1 = max(0, int(np.floor(left * s))), min(self.w * s, int(np.ceil(right * s)) + 1)
        r1, c1 = max(r0, r1), max(c0, c1)
        return _Window(self, r0, r1, c0, c1)

    def image(self) -> np.ndarray:
        s = self.ss
        down = np.zeros((self.h, self.w, 3), np.float32)
        for i in range(s):
            for j in range(s):
                down += self.rgb[i::s, j::s]
        down /= s * s
        return np.clip(np.round(down), 0, 255).astype(np.uint8)


class _Window:
    def __init__(self, canvas: _Canvas, r0: int, r1: int, c0: int, c1: int):
        s = canvas.ss
        self.rgb = canvas.rgb[r0:r1, c0:c1]
        self.y = ((np.arange(r0, r1) + 0.5) / s)[:, None]
        self.x = ((np.arange(c0, c1) + 0.5) / s)[None, :]

    def ellipse(self, cy, cx, ry, rx) -> np.ndarray:
        if ry <= 0 or rx <= 0:
            return np.zeros(self.rgb.shape[:2], bool)
        return ((self.y - cy) / ry) ** 2 + ((self.x - cx) / rx) ** 2 <= 1.0

    def paint(self, mask, colour):
        self.rgb[mask] = np.asarray(colour, np.float32)


def _ellipse_window(canvas: _Canvas, cy, cx, ry, rx) -> _Window:
    return canvas.window(cy - ry, cy + ry, cx - rx, cx + rx)


def draw_face(params: FaceParams, size: int | tuple[int, int] = DEFAULT_SIZE, opening: float = 0.0,
              sway: tuple[float, float] = (0.0, 0.0), blink: float = 0.0,
              supersample: int = SUPERSAMPLE) -> np.ndarray:
    """uint8 [H, W, 3] picture of the face. size: H (square) or (H, W). opening and blink in [0, 1]; sway (dy, dx)
    in fractions of the height, at most `MAX_SWAY` each."""
    height, width = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if height < 16 or width < 16:
        raise ValueError(f"faces need at least 16x16 pixels, got {height}x{width}")
    p = params
    opening = float(np.clip(opening, 0, 1))
    blink = float(np.clip(blink, 0, 1))
    dy, dx = (float(np.clip(s, -MAX_SWAY, MAX_SWAY)) for s in sway)
    u = float(height)                                    # lengths are fractions of the height
    cy = (p.centre_y + dy) * u
    cx = width / 2 + (p.centre_x + dx) * u
    canvas = _Canvas(height, width, p.background, supersample)

    hair_cy, hair_ry, hair_rx = cy - 0.15 * p.face_ry * u, p.hair_ry * u, p.hair_rx * u
    face_ry, face_rx = p.face_ry * u, p.face_rx * u

    def hair_mask(win: _Window) -> np.ndarray:
        mask = win.ellipse(hair_cy, cx, hair_ry, hair_rx)
        if p.long_hair > 0:
            end_cy = cy + p.long_hair * u - hair_rx * 0.3
            mask |= (win.y >= hair_cy) & (win.y <= end_cy) & (np.abs(win.x - cx) <= hair_rx)
            mask |= win.ellipse(end_cy, cx, hair_rx * 0.3, hair_rx)
        return mask

    hair_bottom = max(hair_cy + hair_ry, cy + p.long_hair * u)
    win = canvas.window(hair_cy - hair_ry, hair_bottom, cx - hair_rx, cx + hair_rx)
    win.paint(hair_mask(win), p.hair)
    win = _ellipse_window(canvas, cy, cx, face_ry, face_rx)
    win.paint(win.ellipse(cy, cx, face_ry, face_rx), p.skin)

    eye_cy = cy + p.eye_y * u
    eye_rx, eye_ry = p.eye_rx * u, 0.7 * p.eye_rx * u
    lid = tuple(round(0.82 * v) for v in p.skin)
    for side in (-1, 1):
        ex = cx + side * p.eye_dx * u
        win = _ellipse_window(canvas, eye_cy, ex, eye_ry, eye_rx)
        eye = win.ellipse(eye_cy, ex, eye_ry, eye_rx)
        win.paint(eye, EYE_WHITE)
        win.paint(eye & win.ellipse(eye_cy, ex, 0.75 * eye_ry, 0.55 * eye_rx), p.iris)
        win.paint(eye & win.ellipse(eye_cy, ex, 0.35 * eye_ry, 0.25 * eye_rx), (12, 10, 10))
        if blink > 0:
            win.paint(eye & (win.y <= eye_cy - eye_ry + 2 * eye_ry * blink), lid)
        brow_cy, brow_ry, brow_rx = eye_cy - eye_ry - p.brow_gap * u, 0.3 * eye_rx, 1.25 * eye_rx
        win = _ellipse_window(canvas, brow_cy, ex, brow_ry, brow_rx)
        win.paint(win.ellipse(brow_cy, ex, brow_ry, brow_rx), p.hair)

    mouth_cy = cy + p.mouth_y * u
    mouth_rx = p.mouth_rx * u
    inner_ry = opening * p.mouth_open * u
    lip = p.lip * u
    win = _ellipse_window(canvas, mouth_cy, cx, inner_ry + lip, mouth_rx)
    win.paint(win.ellipse(mouth_cy, cx, inner_ry + lip, mouth_rx), p.lips)
    win.paint(win.ellipse(mouth_cy, cx, inner_ry, mouth_rx - lip), MOUTH_INTERIOR)

    fringe_y = (p.fringe_y + dy) * u
    win = canvas.window(cy - face_ry, fringe_y, cx - face_rx, cx + face_rx)
    win.paint(hair_mask(win) & win.ellipse(cy, cx, face_ry, face_rx) & (win.y <= fringe_y), p.hair)
    return canvas.image()


def reference_face(params: FaceParams, size: int | tuple[int, int] = DEFAULT_SIZE) -> np.ndarray:
    """The face at rest: mouth closed, eyes open, head centred."""
    return draw_face(params, size)


def save_png(image: np.ndarray, path) -> None:
    from PIL import Image

    Image.fromarray(np.asarray(image, np.uint8)).save(str(path), format="PNG")
