"""Writing the stream as an H.264 + AAC mp4, block by block, so that a kill never loses a finished block.

Two files grow side by side while the stream runs:
  * `<out stem>.partial.ts`: MPEG-TS with no encoder delay (zero-latency x264, one thread) and the audio written one
    block ahead so the muxer never holds a frame back; each block's bytes reach the file in one write when the block
    is done. A crash, SIGKILL or Ctrl-C leaves it playable, holding every block written so far, video and audio, and
    never part of a block.
  * a hidden `.<out name>.tmp.mp4`: a regular mp4 of the same frames and audio, finished and renamed to the final
    name only when the stream is complete, so a file under the final name is always whole.
MPEG-TS rather than a fragmented mp4 for the partial file because the mp4 muxer keeps the last packet of a fragment
back until the next one arrives and mistimes fragments when audio and video interleave.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def partial_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".partial.ts")


class _BlockFile:
    """The partial file as its muxer sees it: what the muxer writes waits in memory until `commit()` appends it with
    one write() call, so a kill between two commits leaves whole blocks, and a kill cannot land inside a write()."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pending = bytearray()

    def write(self, data) -> int:
        self._pending += data
        return len(data)

    def commit(self):
        data = bytes(self._pending)
        self._pending.clear()
        while data:
            data = data[os.write(self._fd, data):]

    def close(self, commit: bool = True):
        # Idempotent: the writer's `abort()` may follow a `close()` that failed after this file was closed (the
        # finished mp4 could not be published), and closing a descriptor twice could close a file opened since under
        # the same number. The descriptor is released even when the last commit fails (a full disk).
        if self._fd is None:
            return
        try:
            if commit:
                self.commit()
        finally:
            os.close(self._fd)
            self._fd = None


class _Encoder:
    """One container with an H.264 video stream and an optional AAC mono audio stream, written to a path or to a
    `_BlockFile`."""

    def __init__(self, target, fmt: str, options: dict, width: int, height: int, fps: int,
                 sample_rate: int | None, gop: int, crf: int):
        self.container = av.open(target if isinstance(target, _BlockFile) else str(target), "w", format=fmt,
                                 options=options)
        self.video = self.container.add_stream(
            "libx264", rate=fps, options={"tune": "zerolatency", "preset": "veryfast", "crf": str(crf), "g": str(gop)})
        self.video.width, self.video.height, self.video.pix_fmt = width, height, "yuv420p"
        self.video.thread_count = 1          # frame threads would hold frames back
        self.audio = None
        if sample_rate is not None:
            self.audio = self.container.add_stream("aac", rate=sample_rate)
            self.audio.layout = "mono"
        self.fps, self.sample_rate = fps, sample_rate

    def frame(self, img: np.ndarray, index: int):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
        frame.pts, frame.time_base = index, Fraction(1, self.fps)
        for packet in self.video.encode(frame):
            self.container.mux(packet)

    def samples(self, chunk: np.ndarray, start: int):
        frame = av.AudioFrame.from_ndarray(chunk[None], format="fltp", layout="mono")
        frame.sample_rate, frame.pts, frame.time_base = self.sample_rate, start, Fraction(1, self.sample_rate)
        for packet in self.audio.encode(frame):
            self.container.mux(packet)

    def finish(self):
        for stream in (self.audio, self.video):
            if stream is not None:
                for packet in stream.encode(None):
                    self.container.mux(packet)
        self.container.close()


class StreamingMP4Writer:
    """`write(frames)` per block, `close()` to publish the finished mp4, `abort()` to keep only the partial file.

    frames: uint8 [n, H, W, 3]. audio: float32 mono samples at `sample_rate` (the whole track, known up front), or
    None for a silent video. With `total_frames` (the planned length) the audio track ends with the video; before
    that, audio past the end of the track is silence.
    """

    def __init__(self, path, width: int, height: int, fps: int = 25, audio: np.ndarray | None = None,
                 sample_rate: int = 16000, frames_per_block: int = 12, crf: int = 18,
                 total_frames: int | None = None):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.tmp = self.path.with_name("." + self.path.name + ".tmp.mp4")
        self.fps, self.sample_rate = fps, sample_rate
        self.audio = None if audio is None else np.asarray(audio, np.float32).reshape(-1)
        rate = None if self.audio is None else sample_rate
        self._live_file = _BlockFile(self.partial)
        self._live = _Encoder(self._live_file, "mpegts", {"flush_packets": "1", "max_interleave_delta": "1"},
                              width, height, fps, rate, frames_per_block, crf)
        self._final = _Encoder(self.tmp, "mp4", {"movflags": "faststart"}, width, height, fps, rate,
                               frames_per_block, crf)
        self.frames_written = 0
        self._audio_pos = 0
        self._block = frames_per_block
        self._audio_end = None if total_frames is None else self._samples_at(total_frames)

    def _samples_at(self, frame_index: int) -> int:
        return frame_index * self.sample_rate // self.fps

    def _feed_audio(self, upto: int):
        if self._audio_end is not None:
            upto = min(upto, self._audio_end)
        while self._audio_pos < upto:
            n = min(1024, upto - self._audio_pos)
            chunk = self.audio[self._audio_pos:self._audio_pos + n]
            chunk = np.pad(chunk, (0, n - len(chunk)))
            for enc in (self._live, self._final):
                enc.samples(chunk, self._audio_pos)
            self._audio_pos += n

    def write(self, frames: np.ndarray) -> None:
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [n, H, W, 3], got {frames.dtype} {frames.shape}")
        for img in frames:
            for enc in (self._live, self._final):
                enc.frame(img, self.frames_written)
            self.frames_written += 1
        if self.audio is not None:
            self._feed_audio(self._samples_at(self.frames_written + self._block))
        self._live_file.commit()

    def close(self) -> Path:
        """Finishes both files, publishes the mp4 under its final name and removes the partial file."""
        if self.audio is not None:
            self._feed_audio(self._samples_at(self.frames_written))
        self._live.finish()
        self._live_file.close()
        self._final.finish()
        os.replace(self.tmp, self.path)
        self.partial.unlink()
        return self.path

    def abort(self) -> Path:
        """Stops writing (e.g. on Ctrl-C): the partial file stays playable; the unfinished mp4 is removed."""
        for enc in (self._live, self._final):
            try:
                enc.container.close()
            except Exception:  # mid-packet; what is on disk of the partial file is already playable
                pass
        self._live_file.close(commit=False)   # a block cut short stays out of the partial file
        self.tmp.unlink(missing_ok=True)
        return self.partial


def probe(path) -> dict:
    """Frame count, nominal fps, durations and size of a video file.

    `audio_s` runs from the first video frame to the end of the last audio packet, so the encoder's priming
    samples before the video starts (which players skip) do not count.
    """
    info = {"video_frames": 0, "fps": None, "video_s": 0.0, "audio_s": 0.0, "has_audio": False}
    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        info["fps"] = float(vs.base_rate or vs.guessed_rate)
        pts = [p.pts for p in c.demux(vs) if p.size and p.pts is not None]
        info["video_frames"] = len(pts)
        video_start = float(min(pts) * vs.time_base) if pts else 0.0
        info["width"], info["height"] = vs.codec_context.width, vs.codec_context.height
    with av.open(str(path)) as c:
        if c.streams.audio:
            a = c.streams.audio[0]
            info["has_audio"] = True
            # MPEG-TS writes the priming packet's negative time wrapped around 2**33: leave it out
            ends = [p.pts + (p.duration or 0) for p in c.demux(a) if p.size and p.pts is not None and p.pts < 2**32]
            if ends:
                info["audio_s"] = float(max(ends) * a.time_base) - video_start
    if info["fps"]:
        info["video_s"] = info["video_frames"] / info["fps"]
    return info
