"""Writing the stream as an H.264 + AAC mp4, block by block, so that a kill never loses a finished block.

While the stream runs, frames go to `<out stem>.partial.mp4`, a fragmented mp4 flushed to disk packet by packet
(one fragment per frame, no encoder or muxer delay): a crash, SIGKILL or Ctrl-C leaves a playable file holding every
block written so far, video and audio. Only when the stream is complete is the file closed and renamed to its final
name, so a file under the final name is always complete.

Audio is muxed one block ahead of the video: the muxer emits a packet only when a later one arrives, so writing the
next block's audio after this block's frames pushes every frame of this block to disk.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

_FRAGMENTED = {"movflags": "frag_every_frame+empty_moov+default_base_moof", "flush_packets": "1",
               "max_interleave_delta": "1"}


def partial_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".partial" + (path.suffix or ".mp4"))


class StreamingMP4Writer:
    """Progressive mp4 writer: `write(frames)` per block, `close()` to finish, `abort()` to leave the partial file.

    frames: uint8 [n, H, W, 3]. audio: float32 mono samples at `sample_rate` (the whole track, known up front), or
    None for a silent video. With `total_frames` (the planned length) the audio track ends with the video; before
    that, audio past the end of the track is silence.
    """

    def __init__(self, path, width: int, height: int, fps: int = 25, audio: np.ndarray | None = None,
                 sample_rate: int = 16000, frames_per_block: int = 12, crf: int = 18,
                 total_frames: int | None = None):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.fps, self.sample_rate = fps, sample_rate
        self.audio = None if audio is None else np.asarray(audio, np.float32).reshape(-1)
        self.frames_written = 0
        self._audio_pos = 0
        self._container = av.open(str(self.partial), "w", format="mp4", options=dict(_FRAGMENTED))
        self._video = self._container.add_stream(
            "libx264", rate=fps,
            options={"tune": "zerolatency", "preset": "veryfast", "crf": str(crf), "g": str(frames_per_block)})
        self._video.width, self._video.height, self._video.pix_fmt = width, height, "yuv420p"
        self._video.thread_count = 1          # frame threads would hold frames back
        self._audio = None
        if self.audio is not None:
            self._audio = self._container.add_stream("aac", rate=sample_rate)
            self._audio.layout = "mono"
        self._block = frames_per_block
        self._audio_end = None if total_frames is None else self._samples_at(total_frames)

    def _feed_audio(self, upto: int):
        if self._audio_end is not None:
            upto = min(upto, self._audio_end)
        while self._audio_pos < upto:
            n = min(1024, upto - self._audio_pos)
            chunk = self.audio[self._audio_pos:self._audio_pos + n]
            chunk = np.pad(chunk, (0, n - len(chunk)))
            frame = av.AudioFrame.from_ndarray(chunk[None], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = self.sample_rate, self._audio_pos
            frame.time_base = Fraction(1, self.sample_rate)
            for packet in self._audio.encode(frame):
                self._container.mux(packet)
            self._audio_pos += n

    def _samples_at(self, frame_index: int) -> int:
        return frame_index * self.sample_rate // self.fps

    def write(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [n, H, W, 3], got {frames.dtype} {frames.shape}")
        for img in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts = self.frames_written
            frame.time_base = Fraction(1, self.fps)
            for packet in self._video.encode(frame):
                self._container.mux(packet)
            self.frames_written += 1
        if self._audio is not None:
            self._feed_audio(self._samples_at(self.frames_written + self._block))

    def close(self) -> Path:
        """Finishes the stream: flushes the encoders, closes the file and renames it to the final name."""
        if self._audio is not None:
            self._feed_audio(self._samples_at(self.frames_written))
            for packet in self._audio.encode(None):
                self._container.mux(packet)
        for packet in self._video.encode(None):
            self._container.mux(packet)
        self._container.close()
        os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> Path:
        """Closes the partial file as it is (e.g. on Ctrl-C): it stays playable under its .partial name."""
        try:
            self._container.close()
        except Exception:  # the container may be mid-packet; what is on disk is already playable
            pass
        return self.partial


def probe(path) -> dict:
    """Frame count, fps and durations of an mp4 (for tests and summaries)."""
    with av.open(str(path)) as c:
        info = {"video_frames": 0, "fps": None, "video_s": 0.0, "audio_s": 0.0, "has_audio": False}
        vs = c.streams.video[0]
        info["fps"] = float(vs.base_rate or vs.guessed_rate)   # the nominal rate (fragmented files lack a total)
        info["video_frames"] = sum(1 for p in c.demux(vs) if p.size)
        info["width"], info["height"] = vs.codec_context.width, vs.codec_context.height
    with av.open(str(path)) as c:
        if c.streams.audio:
            a = c.streams.audio[0]
            info["has_audio"] = True
            spans = [(p.pts, p.pts + (p.duration or 0)) for p in c.demux(a) if p.size and p.pts is not None]
            if spans:
                info["audio_s"] = float((max(e for _, e in spans) - min(s for s, _ in spans)) * a.time_base)
    if info["fps"]:
        info["video_s"] = info["video_frames"] / info["fps"]
    return info
