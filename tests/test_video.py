"""The streaming writer's failure paths (io/video.py)."""

import os

import numpy as np
import pytest

from liveavatar_jax.io.video import StreamingMP4Writer, probe


def test_abort_after_a_failed_close_leaves_other_files_open(tmp_path):
    # close() fails after the partial file's descriptor is closed (the finished mp4 cannot take the name: a folder
    # is there); the caller's abort() must not close that descriptor number again, which a file opened since holds.
    out = tmp_path / "clip.mp4"
    out.mkdir()
    writer = StreamingMP4Writer(out, 32, 32, fps=25, frames_per_block=4)
    writer.write(np.full((4, 32, 32, 3), 128, np.uint8))
    with pytest.raises(OSError):
        writer.close()
    other = os.open(tmp_path / "other.bin", os.O_WRONLY | os.O_CREAT)
    try:
        partial = writer.abort()
        os.fstat(other)     # raises EBADF if abort() closed it
        assert probe(partial)["video_frames"] == 4
    finally:
        os.close(other)
