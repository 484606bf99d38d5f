"""One browser session: a WebRTC peer connection, a worker thread running `Pipeline.live`, and the playout.

Threads: the event loop owns the peer connection, the tracks and the playout; the worker thread owns the JAX work.
They meet in two places only: a `queue.Queue` of 16 kHz audio chunks (loop -> worker) and
`loop.call_soon_threadsafe` for finished blocks (worker -> loop). The worker never touches aiortc objects and the
loop never waits on JAX, so one slow or failing session cannot stall the others or the HTTP server.

Ending: `end_audio()` (the page says the file is over, the remote track ends, or the time limit is reached) lets the
pipeline finish its last blocks and the playout drain before closing; `close(reason)` (Stop, the page left, the
connection dropped, a failure) stops at once. Either way the worker thread is joined and every reference to the
session's device arrays (engine state, context) goes with the generator, so /metrics shows it as freed.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass

import jax
import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from liveavatar_jax.serve.media import (SAMPLE_RATE, AudioIngest, AvatarVideoTrack, Playout, SpeechAudioTrack)
from liveavatar_jax.serve.metrics import SessionMetrics, StageTimes

log = logging.getLogger("liveavatar.serve")

_END = object()      # the audio is over: finish the stream
_ABORT = object()    # stop now


class SessionAborted(Exception):
    """Raised inside the pipeline's chunk iterator to unwind `Pipeline.live` when the session is closed."""


@dataclass(frozen=True)
class SessionOptions:
    seed: int = 0
    playout_delay_s: float = 0.1
    connect_timeout_s: float = 20.0     # offer answered -> media flowing
    idle_timeout_s: float = 5.0         # no audio packet for this long after the first: the connection is gone
    max_session_s: float = 600.0        # then the audio is ended as if the file were over
    drain_grace_s: float = 3.0          # after the last due frame, how long the tracks may take to send it
    # STUN/TURN URLs for clients behind NAT. Empty by default: aiortc would otherwise ask a public STUN server,
    # which a local server has no use for.
    ice_servers: tuple[str, ...] = ()


class TimedEngine:
    """The shared engine seen through one session: times `init` and `step` (each waits for its result, which
    `Pipeline.live` reads back at once anyway) and marks where audio encoding ends."""

    def __init__(self, inner, stages: StageTimes, on_step_start):
        self._inner = inner
        self._stages = stages
        self._on_step_start = on_step_start

    def init(self, ctx, seed):
        t0 = time.perf_counter()
        state = jax.block_until_ready(self._inner.init(ctx, seed))
        self._stages.engine_init_s = time.perf_counter() - t0
        return state

    def step(self, state, ctx, audio, **kwargs):
        self._on_step_start()
        t0 = time.perf_counter()
        state, out = self._inner.step(state, ctx, audio, **kwargs)
        jax.block_until_ready(out)      # a pipelined engine's fill ticks return no frames; time them all the same
        self._stages.add_step(time.perf_counter() - t0)
        return state, out

    def __getattr__(self, name):
        attr = getattr(self._inner, name)      # AttributeError keeps `hasattr(engine, "flush")` truthful
        if name != "flush":
            return attr

        def flush(state, ctx):
            t0 = time.perf_counter()
            state, rest = attr(state, ctx)
            jax.block_until_ready(rest)
            for _ in rest:
                self._stages.add_step((time.perf_counter() - t0) / len(rest))
            return state, rest
        return flush


class SpeechBuffer:
    """The received 16 kHz speech, kept from the start of the next block's span on (the outgoing audio track
    replays each block's span beside its frames)."""

    def __init__(self):
        self._parts: list[np.ndarray] = []
        self._start = 0          # absolute sample index of the first kept sample
        self._length = 0

    def append(self, samples: np.ndarray):
        self._parts.append(samples)
        self._length += len(samples)

    def take(self, start_s: float, end_s: float) -> np.ndarray:
        """Samples of [start_s, end_s) (zero past what was received); forgets everything before end_s."""
        a, b = int(round(start_s * SAMPLE_RATE)), int(round(end_s * SAMPLE_RATE))
        have = np.concatenate(self._parts) if self._parts else np.zeros(0, np.float32)
        out = np.zeros(max(b - a, 0), np.float32)
        lo, hi = max(a, self._start), min(b, self._start + self._length)
        if lo < hi:
            out[lo - a:hi - a] = have[lo - self._start:hi - self._start]
        keep = max(b - self._start, 0)
        rest = have[keep:]
        self._parts = [rest] if len(rest) else []
        self._start += min(keep, self._length)
        self._length = len(rest)
        return out


class Session:
    def __init__(self, pipeline, image, prompt: str, *, options: SessionOptions, on_closed):
        self.id = uuid.uuid4().hex[:12]
        self.metrics = SessionMetrics(self.id)
        self.options = options
        self._pipeline = pipeline
        self._image = image
        self._prompt = prompt
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(u) for u in options.ice_servers]))
        self.playout = Playout(pipeline.config.fps, options.playout_delay_s)
        self.video = AvatarVideoTrack(self.playout)
        self.audio_out = SpeechAudioTrack(self.playout)
        self.playout.on_first_frame = self._on_first_frame
        self._chunks: queue.Queue = queue.Queue()
        self._speech = SpeechBuffer()
        self._ingest = AudioIngest()
        self._channel = None
        self._tasks: set[asyncio.Task] = set()
        self._audio_open = True
        self._closing = False
        self.closed = asyncio.Event()
        self._audio_mark: float | None = None        # worker: when the current audio chunk was handed over
        self._worker_t0 = 0.0
        self.worker = threading.Thread(target=self._work, name=f"liveavatar-session-{self.id}", daemon=True)

    # ------------------------------------------------------------------------------------------------ set-up

    async def answer(self, offer_sdp: str) -> RTCSessionDescription:
        """Applies the browser's offer (an audio track to send us, a video track to receive) and returns the answer."""
        pc = self.pc

        @pc.on("track")
        def on_track(track):
            if track.kind == "audio":
                self._spawn(self._read_audio(track))

        @pc.on("datachannel")
        def on_datachannel(channel):
            self._channel = channel

            @channel.on("message")
            def on_message(message):
                self._on_control(message)

        @pc.on("connectionstatechange")
        async def on_state():
            state = pc.connectionState
            log.info("session %s: connection %s", self.id, state)
            if state == "connected" and self.metrics.state == "connecting":
                self.metrics.state = "streaming"
            elif state in ("failed", "closed"):
                await self.close("connection_lost" if state == "failed" else "connection_closed")

        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        kinds = [t.kind for t in pc.getTransceivers()]
        if "audio" not in kinds or "video" not in kinds:
            raise ValueError("the offer must carry an audio track (the speech) and a video transceiver (to receive "
                             f"the avatar); it has {kinds or 'no media'}")
        pc.addTrack(self.audio_out)
        pc.addTrack(self.video)
        await pc.setLocalDescription(await pc.createAnswer())
        self.worker.start()
        self._spawn(self._watchdog())
        return pc.localDescription

    def _spawn(self, coro):
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------------------------------------ audio in

    async def _read_audio(self, track):
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                self.end_audio("audio_track_ended")
                return
            if not self._audio_open:
                continue
            try:
                samples = self._ingest.push(frame)
            except Exception as e:   # an undecodable frame ends this session, not the server
                log.exception("session %s: incoming audio cannot be resampled", self.id)
                self.metrics.error = f"incoming audio cannot be resampled: {type(e).__name__}: {e}"
                self.send_control(type="error", message=f"The server cannot use this audio: {e}")
                self._spawn(self.close("failed"))
                return
            now = time.monotonic()
            if self.metrics.first_audio is None:
                self.metrics.first_audio = now
            self.metrics.last_audio = now
            if len(samples):
                self._chunks.put(samples)

    def end_audio(self, reason: str):
        """No more speech: the pipeline finishes its last blocks, the playout drains, then the session closes."""
        if not self._audio_open or self._closing:
            return
        self._audio_open = False
        self.metrics.end_reason = reason
        log.info("session %s: audio ended (%s)", self.id, reason)
        self._chunks.put(_END)

    def _on_control(self, message):
        try:
            msg = json.loads(message) if isinstance(message, str) and len(message) < 4096 else None
        except ValueError:
            msg = None
        if not isinstance(msg, dict):
            log.warning("session %s: ignored a malformed control message (%d chars)", self.id, len(message or ""))
            return
        kind = msg.get("type")
        if kind == "end":
            self.end_audio("audio_ended")
        elif kind == "stop":
            self._spawn(self.close("client_stopped"))
        elif kind == "client_stats":
            self.metrics.update_client(msg)
        else:
            log.warning("session %s: ignored a control message of unknown type %r", self.id, str(kind)[:40])

    async def _flush_control(self, timeout: float = 0.5):
        """Gives a last control message (why the session ends) time to leave before the connection closes."""
        channel, deadline = self._channel, time.monotonic() + timeout
        while channel is not None and channel.readyState == "open" and channel.bufferedAmount > 0 \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)

    def send_control(self, **message):
        channel = self._channel
        if channel is not None and channel.readyState == "open":
            try:
                channel.send(json.dumps(message))
            except Exception as e:  # a channel closing under us is not worth failing the session for
                log.debug("session %s: control message not sent: %s", self.id, e)

    # ------------------------------------------------------------------------------------------------ worker

    def _chunk_source(self):
        """Runs in the worker: blocks on the queue, hands the pipeline everything that arrived meanwhile."""
        stages = self.metrics.stages
        if stages.prepare_s is None:
            stages.prepare_s = time.perf_counter() - self._worker_t0
        while True:
            self._close_audio_mark()
            item = self._chunks.get()
            items = [item]
            while item is not _END and item is not _ABORT:
                try:
                    item = self._chunks.get_nowait()
                except queue.Empty:
                    break
                items.append(item)
            if items[-1] is _ABORT:
                raise SessionAborted
            samples = [x for x in items if isinstance(x, np.ndarray)]
            if samples:
                chunk = np.concatenate(samples)
                self._speech.append(chunk)
                with stages.lock:
                    stages.audio_in_samples += len(chunk)
                self._audio_mark = time.perf_counter()
                yield chunk
            if items[-1] is _END:
                self._close_audio_mark()
                return

    def _close_audio_mark(self):
        if self._audio_mark is not None:
            self.metrics.stages.add_audio_encode(time.perf_counter() - self._audio_mark)
            self._audio_mark = None

    def _work(self):
        self._worker_t0 = time.perf_counter()
        outcome, error = "done", None
        blocks = None
        try:
            # Sessions share the networks and compiled programs; the engine state lives in this generator only.
            view = copy.copy(self._pipeline)
            view.engine = TimedEngine(self._pipeline.engine, self.metrics.stages, self._close_audio_mark)
            blocks = view.live(self._image, self._prompt, self._chunk_source(), seed=self.options.seed)
            for block in blocks:
                start, end = block["audio_span"]
                speech = self._speech.take(start, end)
                self._post(self._on_block, block["index"], block["frames"], speech, start)
                if self._closing:
                    break
        except SessionAborted:
            outcome = "aborted"
        except Exception as e:  # any failure ends this session only
            outcome, error = "failed", f"{type(e).__name__}: {e}"
            log.exception("session %s: the pipeline failed", self.id)
        finally:
            if blocks is not None:
                blocks.close()
            blocks = view = None
            self._image = None
            self._post(self._on_worker_done, outcome, error)

    def _post(self, fn, *args):
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is gone (server shutting down)
            pass

    # ------------------------------------------------------------------------------------------------ loop side

    def _on_block(self, index, frames, speech, audio_start_s):
        if self._closing:
            return
        first = self.playout.stats.blocks == 0
        self.playout.add_block(index, frames, speech, audio_start_s)
        if first:
            log.info("session %s: first block ready", self.id)
        s = self.playout.stats
        self.send_control(type="stats", block=index, frames_generated=s.frames_generated, late_frames=s.late_frames,
                          stall_s=round(s.stall_s, 3))

    def _on_first_frame(self):
        m, sent = self.metrics, self.playout.stats.first_frame_sent
        log.info("session %s: first frame sent", self.id)
        self.send_control(type="first_frame", from_offer_s=round(sent - m.created, 3),
                          from_first_audio_s=None if m.first_audio is None else round(sent - m.first_audio, 3))

    def _on_worker_done(self, outcome, error):
        if outcome == "failed":
            self.metrics.error = error
            self.send_control(type="error", message=f"The avatar pipeline failed: {error}")
            self._spawn(self.close("failed"))
        elif outcome == "done" and not self._closing:
            self.playout.finish()
            self._spawn(self._finish_after_drain())

    async def _finish_after_drain(self):
        p = self.playout
        budget = max(0.0, p.last_due_clock() - p.clock()) + self.options.drain_grace_s
        try:
            await asyncio.wait_for(p.drained.wait(), timeout=budget)
        except asyncio.TimeoutError:
            log.warning("session %s: playout did not drain in %.1f s", self.id, budget)
        await self.close(self.metrics.end_reason or "audio_ended")

    async def _watchdog(self):
        o = self.options
        while not self._closing:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            m = self.metrics
            if m.first_audio is None:
                if now - m.created > o.connect_timeout_s:
                    self._spawn(self.close("connect_timeout"))
                    return
            elif self._audio_open and now - m.last_audio > o.idle_timeout_s:
                self._spawn(self.close("connection_lost"))
                return
            if self._audio_open and now - m.created > o.max_session_s:
                self.end_audio("time_limit")

    async def close(self, reason: str):
        """Stops everything of this session; safe to call more than once and from any of its callbacks."""
        if self._closing:
            await self.closed.wait()
            return
        self._closing = True
        m = self.metrics
        m.end_reason = reason
        m.state = "failed" if reason == "failed" else "ended"
        log.info("session %s: closing (%s)", self.id, reason)
        self.send_control(type="ended", reason=reason, **({"message": m.error} if m.error else {}))
        await self._flush_control()
        self._audio_open = False
        self._chunks.put(_ABORT)
        self.playout.finish()
        try:
            await self.pc.close()
        except Exception:
            log.exception("session %s: closing the peer connection failed", self.id)
        self.video.stop()
        self.audio_out.stop()
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        # The worker leaves at its next chunk request or block boundary; joining it off the loop keeps HTTP alive.
        if self.worker.is_alive() or self.worker.ident is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.worker.join, 60.0)
        m.worker_joined = not self.worker.is_alive()
        if not m.worker_joined:
            log.error("session %s: the worker thread did not stop within 60 s", self.id)
        m.ended = time.monotonic()
        # Only the metrics outlive the session; frames, speech and queued audio go now.
        self.playout.discard()
        self._pipeline = self._channel = self._speech = self._ingest = None
        self._chunks = queue.Queue()
        self.closed.set()
        self._on_closed(self)

    def to_json(self) -> dict:
        return self.metrics.to_json(self.playout.stats, self.playout.fps)
