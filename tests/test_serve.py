"""infer.serve: the live WebRTC server, tested from a real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright over CDP; no browser is downloaded), plus the server's checks and its playout clock without a browser.

One server subprocess (embedded tiny default, --max_sessions 1) is started and warmed once for the module. The
browser tests skip with the reason when Chromium or Playwright is missing (.ci/run installs both).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("aiortc", reason="infer.serve needs aiortc (pip install aiortc)")
pytest.importorskip("aiohttp", reason="infer.serve needs aiohttp (pip install aiohttp)")

from PIL import Image  # noqa: E402

from conftest import REPO  # noqa: E402

DATA = REPO / "tests" / "data"
SPEECH = DATA / "speech_16k_mono.wav"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)
try:
    import playwright.sync_api  # noqa: F401
    HAVE_PLAYWRIGHT = True
except ImportError:
    HAVE_PLAYWRIGHT = False
needs_browser = pytest.mark.skipif(
    not (HAVE_CHROMIUM and HAVE_PLAYWRIGHT),
    reason=("headless browser tests need Debian's Chromium (apt-get install -y chromium) and Playwright for Python "
            f"(pip install playwright); chromium at {CHROMIUM}: {HAVE_CHROMIUM}, playwright: {HAVE_PLAYWRIGHT}"))

WARMUP_TIMEOUT_S = 420
IDLE_TIMEOUT_S = 2.0


# ------------------------------------------------------------------------------------------------ the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


class ServerProcess:
    def __init__(self, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "infer.serve", "--port", str(self.port), "--max_sessions", "1",
             "--idle_timeout", str(IDLE_TIMEOUT_S)],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self):
        deadline = time.monotonic() + WARMUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"infer.serve exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if get_json(self.url + "/healthz", timeout=2)["ready"]:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"infer.serve was not ready within {WARMUP_TIMEOUT_S} s:\n{self.log()[-3000:]}")

    def metrics(self) -> dict:
        return get_json(self.url + "/metrics")

    def wait_idle(self, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["server"]["active_sessions"] == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"sessions still running after {timeout} s: {json.dumps(m, indent=1)}")
            time.sleep(0.25)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("serve") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------------------ the browser

BROWSER_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    f"--use-file-for-fake-audio-capture={SPEECH}",
    "--autoplay-policy=no-user-gesture-required",
    # WebRTC skips the loopback interface unless told; the server (bound to 127.0.0.1) only talks over it
    "--allow-loopback-in-peer-connection",
]


class Chromium:
    """/usr/bin/chromium started by the test (so it can also be killed outright), driven by Playwright over CDP."""

    def __init__(self, playwright, profile: Path):
        profile.mkdir(parents=True, exist_ok=True)
        self._stderr_path = profile / "stderr.log"
        self._stderr = open(self._stderr_path, "w")
        self.proc = subprocess.Popen([CHROMIUM, *BROWSER_FLAGS, f"--user-data-dir={profile}",
                                      "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=self._stderr)
        endpoint = self._devtools_endpoint()
        self.browser = playwright.chromium.connect_over_cdp(endpoint)
        # The page forbids eval (script-src 'self'); the test's own probes are evaluated past that policy.
        self.context = self.browser.new_context(bypass_csp=True)

    def _devtools_endpoint(self) -> str:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = re.search(r"DevTools listening on (ws://\S+)", self._stderr_path.read_text())
            if found:
                return found.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"chromium did not start:\n{self._stderr_path.read_text()[-2000:]}")

    def open(self, url: str):
        page = self.context.new_page()
        page.goto(url)
        page.wait_for_function("window.liveavatar && liveavatar.config && liveavatar.config.ready", timeout=30000)
        return page

    def kill(self):
        """SIGKILL: the connection drops without any goodbye (no RTCP BYE, no DTLS close, no data channel)."""
        self.proc.kill()
        self.proc.wait()
        self._stderr.close()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.browser.close()
            except Exception:
                pass
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


@pytest.fixture(scope="module")
def playwright_driver():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright_driver, tmp_path_factory):
    chromium = Chromium(playwright_driver, tmp_path_factory.mktemp("chromium"))
    yield chromium
    chromium.close()


def page_state(page) -> dict:
    return page.evaluate("""() => { const s = window.liveavatar; return {status: s.status, ttff_s: s.ttffS,
        frames: s.framesShown, decoded: s.framesDecoded, dropped: s.framesDropped, fps: s.fps, late: s.lateFrames,
        av_offset_ms: s.avOffsetMs, message: s.message, session: s.sessionId, refusal: s.refusal,
        phases: s.phases}; }""")


def video_pixels_vary(page) -> bool:
    """Draws the current video frame on a canvas: a decoded frame has size and content (not one flat colour)."""
    return page.evaluate("""() => { const v = document.getElementById('video');
        if (!v.videoWidth) return false;
        const c = document.createElement('canvas'); c.width = v.videoWidth; c.height = v.videoHeight;
        const g = c.getContext('2d'); g.drawImage(v, 0, 0);
        const d = g.getImageData(0, 0, c.width, c.height).data;
        let lo = 255, hi = 0; for (let i = 0; i < d.length; i += 4) { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); }
        return hi - lo > 8; }""")


def session_entry(metrics: dict, session_id: str) -> dict:
    for s in metrics["sessions"] + metrics["recent"]:
        if s["id"] == session_id:
            return s
    raise AssertionError(f"session {session_id} not in /metrics: {json.dumps(metrics, indent=1)}")


# ------------------------------------------------------------------------------------------------ browser tests

@needs_browser
def test_page_receives_live_video_and_measures_ttff_and_av_offset(server, browser):
    page = browser.open(server.url + "/")
    page.click("#start")
    page.wait_for_function("liveavatar.framesShown >= 100 && liveavatar.avOffsetMs !== null", timeout=60000)
    offsets = []
    for _ in range(4):   # the receiver settles its audio/video sync over the first seconds; take the latest
        time.sleep(0.5)
        offsets.append(page_state(page)["av_offset_ms"])
    state = page_state(page)
    assert state["status"] == "streaming" and state["message"] is None
    assert video_pixels_vary(page)
    assert page.evaluate("[document.getElementById('video').videoWidth, document.getElementById('video').videoHeight]") \
        == [64, 64]
    # media stays on loopback, and no STUN server was asked (only host candidates, only 127.0.0.1)
    answer_candidates = page.evaluate(
        "liveavatar.pc.remoteDescription.sdp.split('\\r\\n').filter(l => l.startsWith('a=candidate'))")
    assert answer_candidates and all(" 127.0.0.1 " in c and " typ host" in c for c in answer_candidates), \
        answer_candidates
    time.sleep(1.2)   # one more client report reaches the server
    during = server.metrics()
    live = session_entry(during, state["session"])
    # the session's engine state is on the device while it streams (and is gone after: see the dropped-connection test)
    assert during["server"]["device_arrays"] > during["server"]["device_arrays_idle"]
    page.click("#stop")
    after = server.wait_idle()
    done = session_entry(after, state["session"])

    client_av = statistics.median(offsets[-3:])
    ttff, av = live["time_to_first_frame"], live["av_offset_ms"]
    print(f"\n[serve] time to first frame: page {state['ttff_s']:.2f} s (Start -> first frame shown), server "
          f"{ttff['from_first_audio_s']:.2f} s (first audio packet -> first frame sent); page set-up "
          f"{ {k: round(v, 2) for k, v in state['phases'].items()} }")
    print(f"[serve] A/V offset (audio ahead): page {client_av:+.0f} ms (receiver playout estimate), server "
          f"{av['server']:+.1f} ms (send skew); fps page {state['fps']:.1f}, delivered {live['fps']['delivered']}, "
          f"compute {live['fps']['compute']}; late frames {live['frames']['late']}, stages {live['stages']}")

    assert state["frames"] > 0 and state["decoded"] > 0
    assert 0 < state["ttff_s"] < 30 and 0 < ttff["from_first_audio_s"] < 30
    assert abs(av["server"]) < 45, av                   # both tracks leave on one clock
    assert -185 <= client_av <= 90, offsets             # ITU-R BT.1359 acceptability window
    assert live["time_to_first_frame"]["client_s"] == pytest.approx(state["ttff_s"], abs=0.01)
    assert done["state"] == "ended" and done["end_reason"] == "client_stopped" and done["worker_joined"]
    assert after["server"]["worker_threads_alive"] == 0


@needs_browser
def test_one_session_more_than_max_sessions_is_refused_on_the_page(server, browser):
    first = browser.open(server.url + "/")
    first.click("#start")
    first.wait_for_function("liveavatar.status === 'streaming'", timeout=30000)
    refused_before = server.metrics()["server"]["sessions_refused"]

    second = browser.open(server.url + "/")
    with second.expect_response("**/api/session") as response_info:
        second.click("#start")
    response = response_info.value
    assert response.status == 503
    assert response.json()["error"] == "busy"
    second.wait_for_function("liveavatar.status === 'busy'", timeout=10000)
    assert second.is_visible("#message")
    shown = second.inner_text("#message")
    assert "busy" in shown and "1 session slot" in shown, shown
    assert page_state(second)["refusal"]["status"] == 503
    assert server.metrics()["server"]["sessions_refused"] == refused_before + 1
    assert page_state(first)["status"] == "streaming"    # the running session is untouched

    first.click("#stop")
    server.wait_idle()
    second.close()
    first.close()


@needs_browser
def test_dropped_connection_frees_the_session_and_a_new_one_is_accepted(server, browser, playwright_driver,
                                                                        tmp_path):
    doomed = Chromium(playwright_driver, tmp_path / "doomed")
    try:
        page = doomed.open(server.url + "/")
        page.click("#start")
        page.wait_for_function("liveavatar.framesShown >= 10", timeout=60000)
        session_id = page_state(page)["session"]
        assert server.metrics()["server"]["active_sessions"] == 1
        dropped_at = time.monotonic()
        doomed.kill()
    finally:
        doomed.close()

    m = server.wait_idle(timeout=IDLE_TIMEOUT_S + 15)
    freed_after = time.monotonic() - dropped_at
    gone = session_entry(m, session_id)
    print(f"\n[serve] dropped connection noticed and freed after {freed_after:.1f} s ({gone['end_reason']})")
    assert gone["end_reason"] in ("connection_lost", "connection_closed"), gone
    assert gone["worker_joined"] is True
    assert m["server"]["worker_threads_alive"] == 0
    assert m["server"]["device_arrays"] <= m["server"]["device_arrays_idle"], m["server"]   # nothing leaked

    page = browser.open(server.url + "/")
    page.click("#start")
    page.wait_for_function("liveavatar.framesShown >= 10", timeout=60000)
    page.click("#stop")
    server.wait_idle()
    assert "Traceback" not in server.log()


@needs_browser
def test_audio_file_session_ends_by_itself_when_the_audio_ends(server, browser):
    page = browser.open(server.url + "/")
    page.set_input_files("#audio-file", str(SPEECH))
    page.check("#src-file")
    page.click("#start")
    page.wait_for_function("liveavatar.status === 'ended'", timeout=60000)
    state = page_state(page)
    assert "audio ended" in state["message"]["text"]
    m = server.wait_idle()
    done = session_entry(m, state["session"])
    assert done["end_reason"] == "audio_ended" and done["worker_joined"]
    # the whole file was streamed and played out: nothing generated was left unsent
    assert done["frames"]["dropped"] == 0 and done["frames"]["sent"] >= 25 * 5
    page.close()


# ------------------------------------------------------------------------------------------------ signalling checks

def multipart(fields: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f"--{boundary}\r\n".encode())
        if isinstance(value, tuple):      # (bytes, content type): a file
            out.write(f'Content-Disposition: form-data; name="{name}"; filename="x"\r\n'
                      f"Content-Type: {value[1]}\r\n\r\n".encode())
            out.write(value[0])
        else:
            out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
            out.write(value.encode() if isinstance(value, str) else value)
        out.write(b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 200)).save(buf, format="PNG")
    return buf.getvalue()


OFFER_SDP = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n"


def test_malformed_signalling_gets_a_clear_4xx_and_the_server_keeps_running(server):
    good = {"type": "offer", "sdp": OFFER_SDP, "prompt": "hello", "sample": "face"}
    huge = png_bytes(8, 8) + b"\0" * (8 * 2**20)
    cases = {
        "not multipart": (b'{"sdp": "v=0"}', "application/json", 415),
        "broken multipart": (b"--nope\r\ngarbage", "multipart/form-data; boundary=zzz", 400),
        "unknown field": (*multipart({**good, "path": "/etc/passwd"}), 400),
        "type is not offer": (*multipart({**good, "type": "answer"}), 400),
        "sdp is not sdp": (*multipart({**good, "sdp": "hello"}), 400),
        "sdp aiortc rejects": (*multipart(good), 400),
        "empty prompt": (*multipart({**good, "prompt": "   "}), 400),
        "unknown sample": (*multipart({**good, "sample": "../../pyproject.toml"}), 400),
        "image and sample": (*multipart({**good, "image": (png_bytes(8, 8), "image/png")}), 400),
        "not an image": (*multipart({k: v for k, v in good.items() if k != "sample"}
                                   | {"image": (b"#!/bin/sh\necho hi\n", "image/png")}), 415),
        "declared as text": (*multipart({k: v for k, v in good.items() if k != "sample"}
                                       | {"image": (png_bytes(8, 8), "text/plain")}), 415),
        "truncated png": (*multipart({k: v for k, v in good.items() if k != "sample"}
                                    | {"image": (png_bytes(64, 64)[:60], "image/png")}), 400),
        "too many pixels": (*multipart({k: v for k, v in good.items() if k != "sample"}
                                      | {"image": (png_bytes(8000, 6000), "image/png")}), 413),
        "too many bytes": (*multipart({k: v for k, v in good.items() if k != "sample"}
                                     | {"image": (huge, "image/png")}), 413),
    }
    for name, (body, ctype, status) in cases.items():
        got, answer = post(server.url + "/api/session", body, ctype)
        assert got == status, (name, got, answer)
        assert answer["error"] and answer["message"], (name, answer)
    for path in ("/static/..%2F..%2F..%2Fpyproject.toml", "/static/../server.py", "/samples/..%2Fapp.js",
                 "/static/%2Fetc%2Fpasswd"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.url + path, timeout=10)
        assert e.value.code == 404, path
    m = server.metrics()["server"]
    assert m["ready"] and m["active_sessions"] == 0 and m["requests_rejected"] >= len(cases)
    assert server.log().count("POST /api/session from 127.0.0.1: 4") >= len(cases)
    assert "Traceback" not in server.log()


def test_the_page_and_its_assets_are_served_with_a_strict_policy(server):
    with urllib.request.urlopen(server.url + "/", timeout=10) as r:
        html = r.read().decode()
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert 'id="start"' in html and "/static/app.js" in html
    config = get_json(server.url + "/api/config")
    assert config["ready"] and config["samples"] == ["face"] and (config["height"], config["width"]) == (64, 64)
    assert config["random_weights"] is False        # the tiny world's committed weights


def test_bad_command_line_exits_2_before_building_anything(tmp_path):
    r = subprocess.run([sys.executable, "-m", "infer.serve", "--config", str(tmp_path / "nope.py")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope.py" in r.stderr
    r = subprocess.run([sys.executable, "-m", "infer.serve", "--max_sessions", "0"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--max_sessions" in r.stderr


# ------------------------------------------------------------------------------------------------ playout clock

class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_playout_puts_frames_and_speech_on_one_grid_and_stalls_both_for_a_late_block():
    from liveavatar_jax.serve.media import SAMPLE_RATE, Playout

    async def scenario():
        clock = FakeClock()
        p = Playout(fps=25, playout_delay_s=0.1, clock=clock)
        frames0 = np.zeros((9, 4, 4, 3), np.uint8)
        speech0 = np.arange(9 * 640, dtype=np.float32)
        clock.t += 2.0
        p.add_block(0, frames0, speech0, audio_start_s=0.12)
        # audio time t plays at anchor + t: block 0 (from 0.12 s) is due 0.12 + 0.1 s after it was ready
        assert p.anchor_sample == 2.1 * SAMPLE_RATE
        due0, _ = await p.next_frame()
        assert due0 == p.anchor_sample + 0.12 * SAMPLE_RATE
        audio, carried = p.audio(due0, 640)
        assert carried and np.array_equal(audio, speech0[:640])       # frame 0 and its speech start together
        # block 1 arrives on time (0.48 s of audio later): no stall
        clock.t += 0.48
        p.add_block(1, np.zeros((12, 4, 4, 3), np.uint8), np.ones(12 * 640, np.float32), audio_start_s=0.48)
        assert p.stats.late_frames == 0 and p.stats.stall_s == 0
        # block 2 arrives 0.3 s after its due time: both tracks move by the lateness (+ the minimum lead)
        clock.t += 0.48 + 0.1 + 0.3
        anchor = p.anchor_sample
        p.add_block(2, np.zeros((12, 4, 4, 3), np.uint8), np.full(12 * 640, 2, np.float32), audio_start_s=0.96)
        assert p.stats.late_frames == 8 and p.stats.stall_s == pytest.approx(0.32, abs=1e-3)
        start2 = p.anchor_sample + int(0.96 * SAMPLE_RATE)
        assert p.anchor_sample - anchor == round(0.32 * SAMPLE_RATE)
        audio, _ = p.audio(start2 - 320, 640)
        assert np.all(audio[:320] == 0) and np.all(audio[320:] == 2)  # silence during the stall, then block 2
        p.finish()
        count = 0
        while True:
            try:
                await p.next_frame()
            except Exception:
                break
            count += 1
        assert count == 9 + 12 + 12 - 1

    # a thread of its own: Playwright's sync API keeps an event loop running on this one
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, scenario()).result()


def test_speech_buffer_returns_each_span_and_forgets_what_is_behind_it():
    from liveavatar_jax.serve.session import SpeechBuffer

    buf = SpeechBuffer()
    samples = np.arange(16000, dtype=np.float32)
    for i in range(0, 16000, 320):
        buf.append(samples[i:i + 320])
    assert np.array_equal(buf.take(0.12, 0.48), samples[1920:7680])
    assert np.array_equal(buf.take(0.48, 0.96), samples[7680:15360])
    tail = buf.take(0.96, 1.44)                       # past the received audio: zeros
    assert np.array_equal(tail[:640], samples[15360:]) and np.all(tail[640:] == 0)
    assert buf._length == 0


def test_uploads_are_decoded_through_the_image_checks_and_fitted_to_the_serving_size():
    from liveavatar_jax.serve.server import serving_geometry
    from liveavatar_jax.serve.uploads import Limits, OfferError, decode_image, fit_to_geometry

    image = decode_image((DATA / "face.png").read_bytes(), Limits())
    assert image.mode == "RGB" and image.size == (128, 160)
    fitted = fit_to_geometry(image, 64, 64)
    assert fitted.size == (64, 64)
    with pytest.raises(OfferError) as e:
        decode_image(png_bytes(50, 50), Limits(max_image_pixels=2000))
    assert e.value.status == 413
    with pytest.raises(OfferError) as e:
        decode_image(b"GIF89a" + b"\0" * 100, Limits())
    assert e.value.status == 415
    with pytest.raises(OfferError) as e:
        decode_image(png_bytes(64, 64)[:80], Limits())
    assert e.value.status == 400 and "uploaded image" in e.value.message and "/tmp" not in e.value.message

    class Config:
        size = "720*400"
    assert serving_geometry(Config) == (704, 384)


# ------------------------------------------------------------------------------------------------ in-process sessions

class FakePipeline:
    """Stands in for Pipeline (no JAX): one 9-frame block per 0.48 s of audio; the prompt "fail" raises after the
    first block, as a pipeline bug or a device error would."""

    class config:
        fps = 25
        size = "64*64"

    class models:
        random_weights = True

    engine = None

    def live(self, image, prompt, chunks, *, seed=0, total_samples=None):
        received, index = 0, 0
        for chunk in chunks:
            received += len(chunk)
            while received >= (index + 1) * 7680:
                frames = np.full((9 if index == 0 else 12, 64, 64, 3), 40 * index % 256, np.uint8)
                start = 0.12 if index == 0 else index * 0.48
                yield {"index": index, "frames": frames, "audio_span": (start, (index + 1) * 0.48)}
                index += 1
                if prompt == "fail":
                    raise RuntimeError("device lost (simulated)")


async def _client_session(base_url: str, prompt: str, seconds: float) -> dict:
    """A Python WebRTC client (aiortc): sends a 440 Hz tone, counts the video frames and control messages."""
    import aiohttp
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack, MediaStreamError

    class Tone(AudioStreamTrack):
        async def recv(self):
            frame = await super().recv()          # 20 ms of silence at 8 kHz, paced
            n = frame.samples
            t = (frame.pts + np.arange(n)) / frame.sample_rate
            frame.planes[0].update((3000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16).tobytes())
            return frame

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(Tone())
    pc.addTransceiver("video", direction="recvonly")
    channel = pc.createDataChannel("control")
    result = {"frames": 0, "messages": [], "status": None}

    @channel.on("message")
    def on_message(message):
        result["messages"].append(json.loads(message))

    @pc.on("track")
    def on_track(track):
        async def count():
            while True:
                try:
                    await track.recv()
                except MediaStreamError:
                    return
                result["frames"] += 1
        asyncio.ensure_future(count())

    await pc.setLocalDescription(await pc.createOffer())
    body, ctype = multipart({"type": "offer", "sdp": pc.localDescription.sdp, "prompt": prompt, "sample": "face"})
    async with aiohttp.ClientSession() as http:
        async with http.post(base_url + "/api/session", data=body, headers={"Content-Type": ctype}) as r:
            result["status"] = r.status
            answer = await r.json()
    if r.status == 200:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not any(m["type"] == "ended" for m in result["messages"]):
            await asyncio.sleep(0.1)
    await pc.close()
    return result


def test_a_failing_session_is_reported_and_the_server_keeps_serving():
    from aiohttp import web

    from liveavatar_jax.serve.server import AvatarServer, restrict_ice_to
    from liveavatar_jax.serve.session import SessionOptions

    restrict_ice_to("127.0.0.1")      # this process's WebRTC stays on loopback too

    async def scenario():
        server = AvatarServer(FakePipeline(), max_sessions=1, options=SessionOptions(idle_timeout_s=3.0))
        server.warm_up()
        runner = web.AppRunner(server.app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            failed = await _client_session(url, "fail", seconds=15)
            for _ in range(100):
                if not server.sessions:
                    break
                await asyncio.sleep(0.1)
            ok = await _client_session(url, "fine", seconds=2.5)
            for _ in range(100):
                if not server.sessions:
                    break
                await asyncio.sleep(0.1)
            return failed, ok, list(server.recent), dict(server.counters)
        finally:
            await runner.cleanup()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        failed, ok, recent, counters = pool.submit(asyncio.run, scenario()).result(timeout=120)

    errors = [m for m in failed["messages"] if m["type"] == "error"]
    assert failed["status"] == 200 and errors and "device lost (simulated)" in errors[0]["message"]
    assert any(m["type"] == "ended" and m["reason"] == "failed" for m in failed["messages"])
    first = recent[0]
    assert first["state"] == "failed" and "device lost" in first["error"] and first["worker_joined"]
    assert counters["failed"] == 1
    # the next session is accepted and streams
    assert ok["status"] == 200 and ok["frames"] > 0, ok
    assert recent[1]["state"] == "ended" and recent[1]["frames"]["sent"] > 0
