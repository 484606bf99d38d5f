"""The tiny world: procedural talking heads whose right mouth for any audio is known (docs/tinyworld.md).

    face.py     faces from a seed (colours, proportions) and their drawing with mouth, sway and blinks
    mouth.py    the law: audio -> mouth opening per video frame
    speech.py   procedural speech-like audio (formant synthesis, numpy only)
    clips.py    clips: frames + audio + ground truth, written as mp4 (+ wav, png, json)
    colour.py   sRGB -> CIE L*a*b*, CIE76 and CIEDE2000 colour differences

`python -m liveavatar_jax.tinyworld {face,clip,clips,dataset} ...` is the command line (see --help).
"""

from liveavatar_jax.tinyworld.clips import Clip, head_motion, make_clip, write_clip, write_clips
from liveavatar_jax.tinyworld.face import FaceParams, draw_face, reference_face, sample_face
from liveavatar_jax.tinyworld.mouth import mouth_features, mouth_openings
from liveavatar_jax.tinyworld.speech import synthesize_speech

__all__ = ["Clip", "FaceParams", "draw_face", "head_motion", "make_clip", "mouth_features", "mouth_openings",
           "reference_face", "sample_face", "synthesize_speech", "write_clip", "write_clips"]
