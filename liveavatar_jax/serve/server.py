"""The web server: one page, WebRTC signalling, /metrics. See docs/serve.md.

Routes
  GET  /                 the page (static/index.html); GET /static/<name> its assets, from a fixed list
  GET  /api/config       what the page needs: samples, output size, fps, limits, whether the server is ready or full
  GET  /samples/<name>   a built-in reference image, by name from a fixed list
  POST /api/session      multipart: sdp + type=offer + prompt + (image | sample) -> {"sdp", "type", "session_id"};
                         503 + JSON when warming up or when --max_sessions are running; 400/413/415 + JSON when the
                         request is malformed
  GET  /metrics          JSON: the server, the running sessions and the last finished ones
  GET  /healthz          {"ready": bool}

The pipeline is built once and warmed (every program compiled) before the first session is accepted. Sessions share
its networks and compiled programs; each has its own engine state, worker thread and peer connection.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import threading
import time
from pathlib import Path

import aioice.ice
import jax
import numpy as np
from aiohttp import web
from PIL import Image

from liveavatar_jax.io import image as image_io
from liveavatar_jax.serve.session import Session, SessionOptions
from liveavatar_jax.serve.uploads import Limits, OfferError, decode_image, fit_to_geometry, read_offer

log = logging.getLogger("liveavatar.serve")

STATIC_DIR = Path(__file__).resolve().parent / "static"
SAMPLES_DIR = STATIC_DIR / "samples"
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".png": "image/png",
                 ".jpg": "image/jpeg", ".svg": "image/svg+xml"}
CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
       "connect-src 'self'; style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'")
RECENT_SESSIONS = 20
WORKER_PREFIX = "liveavatar-session-"


def serving_geometry(config) -> tuple[int, int]:
    """The one output (height, width) every session uses: the config's size read as "H*W" (a portrait 720*400
    gives a portrait video), through the official size rule."""
    size = config.size
    if isinstance(size, str) and "*" in size.replace("x", "*"):
        h, w = (int(p) for p in size.lower().replace("x", "*").split("*"))
    else:
        h = w = max(1, int(image_io.parse_area(size) ** 0.5))
    return image_io.size_for_area(h, w, size)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:      # a host name (mDNS .local): not provably this machine's loopback
        return False


def restrict_ice_to(host: str) -> None:
    """Media goes where HTTP goes. With a loopback --host, the ICE agent (aioice, process-wide) offers only that
    address (by default it skips loopback and offers every other interface), ignores the browser's candidates on
    other addresses and does not answer connectivity checks from them, so every media packet stays on loopback
    and a local-only server answers nothing arriving from another interface."""
    if not (_is_loopback(host) or host == "localhost") or getattr(aioice.ice, "_liveavatar_loopback", False):
        return
    address = "127.0.0.1" if host == "localhost" else host
    connection = aioice.ice.Connection
    add_remote_candidate, request_received = connection.add_remote_candidate, connection.request_received

    async def loopback_candidates_only(self, candidate):
        if candidate is None or _is_loopback(candidate.host):
            await add_remote_candidate(self, candidate)

    def loopback_checks_only(self, message, addr, protocol):
        if _is_loopback(addr[0]):
            request_received(self, message, addr, protocol)

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: [address]
    connection.add_remote_candidate = loopback_candidates_only
    connection.request_received = loopback_checks_only
    aioice.ice._liveavatar_loopback = True


def _file_table(folder: Path) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, content type) for the files directly in `folder`: requests pick from this table, so no part
    of a URL is ever joined to a path."""
    table = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.is_file() and path.suffix in CONTENT_TYPES:
            table[path.name] = (path.read_bytes(), CONTENT_TYPES[path.suffix])
    return table


class AvatarServer:
    def __init__(self, pipeline, *, max_sessions: int = 1, options: SessionOptions = SessionOptions(),
                 limits: Limits = Limits()):
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        self.pipeline = pipeline
        self.max_sessions = max_sessions
        self.options = options
        self.limits = limits
        self.geometry = serving_geometry(pipeline.config)
        self.sessions: dict[str, Session] = {}
        self.recent: collections.deque = collections.deque(maxlen=RECENT_SESSIONS)
        self.counters = collections.Counter()
        self.ready = False
        self.warmup_s: float | None = None
        self.idle_device_arrays: int | None = None
        self.started = time.monotonic()
        self.static = _file_table(STATIC_DIR)
        self.samples = {Path(n).stem: v for n, v in _file_table(SAMPLES_DIR).items()}

    # ------------------------------------------------------------------------------------------------ start-up

    def warm_up(self) -> float:
        """Runs one short stream at the serving size, so every program a session needs is compiled (blocking;
        call it off the event loop)."""
        t0 = time.perf_counter()
        h, w = self.geometry
        image = Image.new("RGB", (w, h), (128, 128, 128))
        rng = np.random.default_rng(0)
        # 3 s reach past block 4, where the sink is replaced (a program of its own), and cover the finish path.
        speech = (0.05 * rng.standard_normal(3 * 16000)).astype(np.float32)
        chunks = [speech[i:i + 8000] for i in range(0, len(speech), 8000)]
        for _ in self.pipeline.live(image, "warm-up", chunks, seed=0):
            pass
        self.warmup_s = time.perf_counter() - t0
        self.idle_device_arrays = len(jax.live_arrays())
        self.ready = True
        return self.warmup_s

    # ------------------------------------------------------------------------------------------------ app

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.limits.max_request_bytes, middlewares=[self._headers])
        app.add_routes([
            web.get("/", self.index),
            web.get("/static/{name}", self.static_file),
            web.get("/samples/{name}", self.sample_file),
            web.get("/api/config", self.config),
            web.post("/api/session", self.create_session),
            web.get("/metrics", self.metrics),
            web.get("/healthz", self.healthz),
        ])
        app.on_shutdown.append(self._close_all)
        return app

    @web.middleware
    async def _headers(self, request, handler):
        response = await handler(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        if response.content_type == "text/html":
            response.headers.setdefault("Content-Security-Policy", CSP)
        return response

    async def index(self, request):
        body, ctype = self.static["index.html"]
        return web.Response(body=body, content_type=ctype)

    async def static_file(self, request):
        entry = self.static.get(request.match_info["name"])
        if entry is None:
            raise web.HTTPNotFound()
        return web.Response(body=entry[0], content_type=entry[1])

    async def sample_file(self, request):
        entry = self.samples.get(request.match_info["name"])
        if entry is None:
            raise web.HTTPNotFound()
        return web.Response(body=entry[0], content_type=entry[1])

    async def config(self, request):
        h, w = self.geometry
        return web.json_response({
            "ready": self.ready, "samples": sorted(self.samples), "height": h, "width": w,
            "fps": self.pipeline.config.fps, "max_sessions": self.max_sessions,
            "active_sessions": len(self.sessions), "max_image_bytes": self.limits.max_image_bytes,
            "max_prompt_chars": self.limits.max_prompt_chars,
            "random_weights": bool(getattr(self.pipeline.models, "random_weights", False)),
        })

    async def healthz(self, request):
        return web.json_response({"ready": self.ready, "active_sessions": len(self.sessions)})

    def _refuse(self, status: int, code: str, message: str, request, **extra):
        self.counters["refused" if status == 503 else "rejected"] += 1
        log.warning("%s %s from %s: %d %s: %s", request.method, request.path, request.remote, status, code, message)
        headers = {"Retry-After": "5"} if status == 503 else None
        return web.json_response({"error": code, "message": message, **extra}, status=status, headers=headers)

    def _busy(self, request):
        return self._refuse(503, "busy", f"The server is busy: all {self.max_sessions} session slot"
                                         f"{'s are' if self.max_sessions > 1 else ' is'} in use. Try again in a "
                                         f"moment.", request, active_sessions=len(self.sessions),
                            max_sessions=self.max_sessions)

    async def create_session(self, request):
        if not self.ready:
            return self._refuse(503, "warming_up", "The server is still compiling the pipeline; try again in a "
                                                   "few seconds.", request)
        if len(self.sessions) >= self.max_sessions:     # refused before the body is even read
            return self._busy(request)
        try:
            offer = await read_offer(request, self.limits)
            if offer.sample is not None:
                entry = self.samples.get(offer.sample)
                if entry is None:
                    raise OfferError(400, "bad_image", f"there is no sample named {offer.sample[:40]!r}")
                data = entry[0]
            else:
                data = offer.image_bytes
            loop = asyncio.get_running_loop()
            image = await loop.run_in_executor(None, decode_image, data, self.limits)
        except OfferError as e:
            return self._refuse(e.status, e.code, e.message, request)
        if len(self.sessions) >= self.max_sessions:     # another request took the slot while this one was read
            return self._busy(request)
        image = fit_to_geometry(image, *self.geometry)
        session = Session(self.pipeline, image, offer.prompt, options=self.options, on_closed=self._on_closed)
        self.sessions[session.id] = session
        self.counters["started"] += 1
        try:
            answer = await session.answer(offer.sdp)
        except Exception as e:     # aiortc rejects a broken SDP with assorted exception types
            await session.close("bad_offer")
            return self._refuse(400, "bad_sdp", f"the SDP offer was rejected: {type(e).__name__}: {e}"[:300],
                                request)
        log.info("session %s: started from %s (%d/%d running)", session.id, request.remote, len(self.sessions),
                 self.max_sessions)
        return web.json_response({"sdp": answer.sdp, "type": answer.type, "session_id": session.id})

    def _on_closed(self, session: Session):
        if self.sessions.pop(session.id, None) is not None:
            if session.metrics.state == "failed":
                self.counters["failed"] += 1
            self.recent.append(session.to_json())
            log.info("session %s: closed (%s); %d running", session.id, session.metrics.end_reason,
                     len(self.sessions))

    async def metrics(self, request):
        arrays = jax.live_arrays()
        workers = [t.name for t in threading.enumerate() if t.name.startswith(WORKER_PREFIX) and t.is_alive()]
        h, w = self.geometry
        return web.json_response({
            "server": {
                "ready": self.ready, "uptime_s": round(time.monotonic() - self.started, 1),
                "warmup_s": None if self.warmup_s is None else round(self.warmup_s, 2),
                "backend": jax.default_backend(), "devices": len(jax.devices()), "height": h, "width": w,
                "fps": self.pipeline.config.fps, "max_sessions": self.max_sessions,
                "active_sessions": len(self.sessions), "sessions_started": self.counters["started"],
                "sessions_refused": self.counters["refused"], "requests_rejected": self.counters["rejected"],
                "sessions_failed": self.counters["failed"], "worker_threads_alive": len(workers),
                "device_arrays": len(arrays), "device_arrays_idle": self.idle_device_arrays,
                "device_bytes": int(sum(a.nbytes for a in arrays)),
            },
            "sessions": [s.to_json() for s in self.sessions.values()],
            "recent": list(reversed(self.recent)),
        })

    async def _close_all(self, app=None):
        await asyncio.gather(*(s.close("server_shutdown") for s in list(self.sessions.values())),
                             return_exceptions=True)
