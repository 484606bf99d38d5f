"""Per-session measurements, reported by /metrics as JSON.

Times are wall-clock seconds. Definitions:

  time to first frame  from_first_audio_s: first audio packet received -> first video frame sent (the server's part:
                       audio look-ahead, pipeline, playout delay); from_offer_s: offer received -> first frame sent;
                       client_s: what the page measured (Start pressed -> first frame decoded), when it reports it
  steady fps           delivered: frames sent per second after the first block; compute: frames per second of the
                       engine alone (median block, the first excluded), i.e. the headroom over 25 fps
  stages               mean seconds per block: audio_encode (wav2vec2 windows), dit_vae (denoise + VAE decode, one
                       jitted step), and once per session: prepare (reference VAE encode + text), engine_init (sink
                       prefill, caches)
  late / dropped       late: frames that were ready after their due time (the stream stalled for them);
                       dropped: frames generated but never sent (the session ended first)
  A/V offset           server_ms: how much later video frames left than the speech due at the same instant (mean
                       send lateness of video minus that of audio); client_ms: the page's estimate from the receiver
                       statistics, when the browser reports one
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field

# Fields the page may report about itself, with the range a sane value lies in; anything else is ignored.
CLIENT_FIELDS = {"ttff_s": (0.0, 3600.0), "fps": (0.0, 1000.0), "frames_decoded": (0, 10**9),
                 "frames_dropped": (0, 10**9), "av_offset_ms": (-60000.0, 60000.0),
                 "jitter_buffer_ms": (0.0, 60000.0)}


def _mean(xs):
    return statistics.fmean(xs) if xs else None


def _round(x, nd=4):
    return None if x is None else round(float(x), nd)


@dataclass
class StageTimes:
    """Filled from the worker thread; read from the event loop (under the lock)."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    prepare_s: float | None = None
    engine_init_s: float | None = None
    audio_encode_s: float = 0.0
    steps: list = field(default_factory=list)       # seconds per engine step (DiT denoise + VAE decode)
    audio_in_samples: int = 0

    def add_step(self, seconds: float):
        with self.lock:
            self.steps.append(seconds)

    def add_audio_encode(self, seconds: float):
        with self.lock:
            self.audio_encode_s += seconds


@dataclass
class SessionMetrics:
    session_id: str
    created: float = field(default_factory=time.monotonic)
    created_wall: float = field(default_factory=time.time)
    first_audio: float | None = None
    last_audio: float | None = None
    ended: float | None = None
    state: str = "connecting"
    end_reason: str | None = None
    error: str | None = None
    worker_joined: bool | None = None
    stages: StageTimes = field(default_factory=StageTimes)
    client: dict = field(default_factory=dict)

    def update_client(self, report: dict) -> None:
        for key, (lo, hi) in CLIENT_FIELDS.items():
            value = report.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi:
                self.client[key] = float(value)

    def to_json(self, playout_stats, fps: int) -> dict:
        p = playout_stats
        with self.stages.lock:
            steps = list(self.stages.steps)
            audio_encode = self.stages.audio_encode_s
            prepare, init = self.stages.prepare_s, self.stages.engine_init_s
            audio_in = self.stages.audio_in_samples
        steady_steps = steps[1:]
        compute_fps = None
        if steady_steps and p is not None and p.blocks > 1:
            # the first block is shorter (dropped frames); the others all hold the same number
            frames_per_block = (p.frames_generated - p.first_block_frames) / (p.blocks - 1)
            compute_fps = frames_per_block / statistics.median(steady_steps)
        ttff_audio = ttff_offer = delivered = None
        late = dropped = sent = generated = 0
        av_server = video_late = None
        if p is not None:
            if p.first_frame_sent is not None:
                ttff_offer = p.first_frame_sent - self.created
                if self.first_audio is not None:
                    ttff_audio = p.first_frame_sent - self.first_audio
            late, sent, generated = p.late_frames, p.frames_sent, p.frames_generated
            if sent > 1 and p.last_frame_sent > p.first_frame_sent:
                delivered = (sent - 1) / (p.last_frame_sent - p.first_frame_sent)
            if self.ended is not None:
                dropped = generated - sent
            video_late = _mean(p.video_lateness)
            audio_late = _mean(p.audio_lateness)
            if video_late is not None and audio_late is not None:
                av_server = 1000 * (video_late - audio_late)
        end = self.ended if self.ended is not None else time.monotonic()
        return {
            "id": self.session_id,
            "state": self.state,
            "end_reason": self.end_reason,
            "error": self.error,
            "started_at": round(self.created_wall, 3),
            "duration_s": _round(end - self.created, 3),
            "audio_in_s": _round(audio_in / 16000, 3),
            "time_to_first_frame": {"from_first_audio_s": _round(ttff_audio, 3), "from_offer_s": _round(ttff_offer, 3),
                                    "client_s": _round(self.client.get("ttff_s"), 3)},
            "fps": {"delivered": _round(delivered, 2), "compute": _round(compute_fps, 2),
                    "client": _round(self.client.get("fps"), 2), "target": fps},
            "stages": {"prepare_s": _round(prepare), "engine_init_s": _round(init),
                       "first_block_s": _round(steps[0]) if steps else None,
                       "audio_encode_s": _round(audio_encode / len(steps)) if steps else None,
                       "dit_vae_s": _round(statistics.median(steady_steps)) if steady_steps else None,
                       "ready_to_due_s": _round(_mean(p.ready_to_due)) if p is not None else None},
            "frames": {"generated": generated, "sent": sent, "late": late, "dropped": dropped,
                       "client_decoded": self.client.get("frames_decoded"),
                       "client_dropped": self.client.get("frames_dropped")},
            "blocks": p.blocks if p is not None else 0,
            "stall_s": _round(p.stall_s, 3) if p is not None else 0.0,
            "send_lateness_ms": _round(1000 * video_late, 2) if video_late is not None else None,
            "av_offset_ms": {"server": _round(av_server, 2), "client": _round(self.client.get("av_offset_ms"), 1)},
            "worker_joined": self.worker_joined,
        }
