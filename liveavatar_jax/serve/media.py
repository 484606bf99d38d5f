"""Media between WebRTC and the pipeline: incoming audio to 16 kHz mono, and a shared playout clock that sends the
generated frames and the speech they show at the same wall-clock instants.

Why a shared clock: aiortc's RTCP sender reports map "the RTP timestamp just sent" to "now", so the browser lines
audio and video up by *when* each was sent. Both outgoing tracks therefore read one `Playout`, which gives every
video frame and every speech sample a wall-clock due time on a common 16 kHz grid; the tracks sleep until that time
and stamp their frames with it.

Timeline: audio time t (seconds of the received speech) is shown at wall time `anchor + t + shift`. `anchor` is set
when the first block is ready (plus `playout_delay_s`, the jitter margin). Block 0 shows audio from 0.12 s on (its
first three frames are dropped) but block 1 needs 12 frames' worth of new audio, so block 0 is scheduled at its
audio time rather than at once: otherwise every stream would stall once at block 1. A block that arrives after its
due time raises `shift` by its lateness (a stall of both tracks together, counted as late frames), so the two tracks
never drift apart.
"""

from __future__ import annotations

import asyncio
import fractions
import math
import time
from collections import deque
from dataclasses import dataclass, field

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

SAMPLE_RATE = 16000            # the pipeline's audio rate, and the outgoing audio's
AUDIO_PTIME = 0.02             # 20 ms audio frames, WebRTC's usual packet time
SAMPLES_PER_PACKET = int(SAMPLE_RATE * AUDIO_PTIME)
VIDEO_CLOCK = 90000            # RTP video clock rate
MIN_LEAD_S = 0.02              # a frame due sooner than this after it is ready counts as late


class AudioIngest:
    """WebRTC audio frames (48 kHz Opus, mono or stereo, s16 or float) -> float32 mono samples at 16 kHz."""

    def __init__(self):
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    def push(self, frame: av.AudioFrame) -> np.ndarray:
        frame.pts = None   # the resampler keeps its own sample count; packet-loss gaps in pts would confuse it
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros(0, np.float32)


@dataclass
class _Block:
    index: int
    start_sample: int          # on the 16 kHz grid counted from the playout origin
    audio: np.ndarray          # float32 speech shown by the frames
    frames_left: int


@dataclass
class PlayoutStats:
    blocks: int = 0
    frames_generated: int = 0
    first_block_frames: int = 0
    frames_sent: int = 0
    late_frames: int = 0
    stall_s: float = 0.0
    first_block_ready: float | None = None      # loop time
    first_frame_sent: float | None = None
    last_frame_sent: float | None = None
    video_lateness: list = field(default_factory=list)    # seconds each frame went out after its due time
    audio_lateness: list = field(default_factory=list)    # same for packets that carry speech
    ready_to_due: list = field(default_factory=list)      # per block: due time of its first frame - ready time


class Playout:
    """Schedules blocks of frames + speech on one clock; `AvatarVideoTrack` and `SpeechAudioTrack` read it."""

    def __init__(self, fps: int, playout_delay_s: float = 0.1, clock=time.monotonic):
        if SAMPLE_RATE % fps:
            raise ValueError(f"fps={fps} must divide {SAMPLE_RATE} so frames fall on whole audio samples")
        self.fps = fps
        self.samples_per_frame = SAMPLE_RATE // fps
        self.playout_delay_s = playout_delay_s
        self.clock = clock
        self.origin = clock()
        self.anchor_sample: int | None = None      # grid sample where audio time 0 would play (shift included)
        self.stats = PlayoutStats()
        self._frames: deque = deque()              # (due sample, rgb uint8 [H, W, 3], block)
        self._blocks: deque[_Block] = deque()
        self._wake = asyncio.Event()
        self._finished = False                     # no more blocks will come
        self._audio_cursor: float | None = None    # grid sample the audio track has read up to
        self.drained = asyncio.Event()             # finished and every frame and speech sample sent
        self.on_first_frame = None                 # called once, when the first video frame goes out

    # -- producer side (the event loop, fed by the session's worker) --------------------------------------------

    def now_sample(self) -> float:
        return (self.clock() - self.origin) * SAMPLE_RATE

    def add_block(self, index: int, frames: np.ndarray, speech: np.ndarray, audio_start_s: float) -> None:
        now = round(self.now_sample())
        if self.anchor_sample is None:
            self.anchor_sample = int(math.ceil(now + self.playout_delay_s * SAMPLE_RATE))
            self.stats.first_block_ready = self.clock()
        start = self.anchor_sample + int(round(audio_start_s * SAMPLE_RATE))
        earliest = now + MIN_LEAD_S * SAMPLE_RATE
        if start < earliest:
            lag = int(math.ceil(earliest - start))
            # Frames whose due time has passed would have been on screen already: they are late.
            overdue = now - start
            if overdue > 0:
                self.stats.late_frames += min(len(frames), int(math.ceil(overdue / self.samples_per_frame)))
            self.stats.stall_s += lag / SAMPLE_RATE
            self.anchor_sample += lag
            start += lag
        self.stats.ready_to_due.append((start - now) / SAMPLE_RATE)
        if self.stats.blocks == 0:
            self.stats.first_block_frames = len(frames)
        self.stats.blocks += 1
        self.stats.frames_generated += len(frames)
        block = _Block(index, start, np.asarray(speech, np.float32), len(frames))
        self._blocks.append(block)
        for k, frame in enumerate(frames):
            self._frames.append((start + k * self.samples_per_frame, frame, block))
        self._wake.set()

    def finish(self) -> None:
        """No more blocks: the video track ends after the last frame, `drained` fires after the last sample."""
        self._finished = True
        self._wake.set()
        self._check_drained()

    def discard(self) -> None:
        """Ends the stream and drops every frame and speech sample not yet sent (the session is closing)."""
        self._finished = True
        self._frames.clear()
        self._blocks.clear()
        self._wake.set()
        self.drained.set()

    def last_due_clock(self) -> float:
        """Clock time at which the last scheduled frame or speech sample is due (now, when nothing is)."""
        ends = [b.start_sample + len(b.audio) for b in self._blocks] + [f[0] for f in self._frames]
        return self.origin + max(ends) / SAMPLE_RATE if ends else self.clock()

    def _check_drained(self):
        if self._finished and not self._frames and not self._blocks:
            self.drained.set()

    # -- consumer side (the tracks) -----------------------------------------------------------------------------

    async def next_frame(self):
        """(due sample, frame) of the next video frame; raises MediaStreamError when the stream is over."""
        while not self._frames:
            if self._finished:
                raise MediaStreamError
            self._wake.clear()
            await self._wake.wait()
        due, frame, block = self._frames.popleft()
        block.frames_left -= 1
        return due, frame

    def record_frame_sent(self, due: int) -> None:
        now = self.clock()
        self.stats.frames_sent += 1
        if self.stats.first_frame_sent is None:
            self.stats.first_frame_sent = now
            if self.on_first_frame is not None:
                self.on_first_frame()
        self.stats.last_frame_sent = now
        self.stats.video_lateness.append((now - self.origin) - due / SAMPLE_RATE)
        self._retire()

    def audio(self, start: int, count: int) -> tuple[np.ndarray, bool]:
        """Speech for grid samples [start, start + count) (zeros where none is scheduled); and whether any was."""
        out = np.zeros(count, np.float32)
        carried = False
        for block in self._blocks:
            lo = max(start, block.start_sample)
            hi = min(start + count, block.start_sample + len(block.audio))
            if lo < hi:
                out[lo - start:hi - start] = block.audio[lo - block.start_sample:hi - block.start_sample]
                carried = True
        self._audio_cursor = start + count
        self._retire()
        return out, carried

    def record_audio_sent(self, due: int) -> None:
        self.stats.audio_lateness.append((self.clock() - self.origin) - due / SAMPLE_RATE)

    def _retire(self):
        cursor = self._audio_cursor
        while self._blocks and self._blocks[0].frames_left == 0 and (
                cursor is None or cursor >= self._blocks[0].start_sample + len(self._blocks[0].audio)):
            self._blocks.popleft()
        self._check_drained()

    def mark_audio_stopped(self) -> None:
        """The audio track will read no more: speech not yet sent no longer holds the stream open."""
        self._audio_cursor = float("inf")
        self._retire()


class AvatarVideoTrack(MediaStreamTrack):
    """The generated frames, each sent at its due time with an RTP timestamp from the same clock."""

    kind = "video"

    def __init__(self, playout: Playout):
        super().__init__()
        self.playout = playout

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        due, frame = await self.playout.next_frame()
        wait = self.playout.origin + due / SAMPLE_RATE - self.playout.clock()
        if wait > 0:
            await asyncio.sleep(wait)
        out = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        out.pts = due * VIDEO_CLOCK // SAMPLE_RATE
        out.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        self.playout.record_frame_sent(due)
        return out


class SpeechAudioTrack(MediaStreamTrack):
    """Continuous 20 ms packets on the playout grid: the speech of each block where it is scheduled, else silence."""

    kind = "audio"

    def __init__(self, playout: Playout):
        super().__init__()
        self.playout = playout
        self._next: int | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        p = self.playout
        if self._next is None:
            self._next = int(p.now_sample()) // SAMPLES_PER_PACKET * SAMPLES_PER_PACKET
        else:
            self._next += SAMPLES_PER_PACKET
        start = self._next
        wait = p.origin + start / SAMPLE_RATE - p.clock()
        if wait > 0:
            await asyncio.sleep(wait)
        samples, carried = p.audio(start, SAMPLES_PER_PACKET)
        if carried:
            p.record_audio_sent(start)
        pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype(np.int16)
        frame = av.AudioFrame(format="s16", layout="mono", samples=SAMPLES_PER_PACKET)
        frame.planes[0].update(pcm.tobytes())
        frame.pts = start
        frame.sample_rate = SAMPLE_RATE
        frame.time_base = fractions.Fraction(1, SAMPLE_RATE)
        return frame

    def stop(self) -> None:
        super().stop()
        self.playout.mark_audio_stopped()
