"""The signalling request, checked before anything is built: a multipart form with the browser's SDP offer, the prompt,
and either an uploaded reference image or the name of a built-in sample.

Every problem raises `OfferError(status, code, message)`; the server answers it as JSON and logs it. Uploaded bytes are
type-checked by their signature, size- and pixel-count-checked from the header, then fully decoded by
`liveavatar_jax.io.image.load_image` from a temporary file the server names itself; the client's file name is never
used.
"""

from __future__ import annotations

import io
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from liveavatar_jax.io import image as image_io

# Formats a browser can upload as a photo; the signature decides, not the declared content type.
IMAGE_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"RIFF", "WEBP"))
DECLARED_IMAGE_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "application/octet-stream", ""}
FIELDS = {"sdp", "type", "prompt", "image", "sample"}


class OfferError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int = 8 * 2**20
    max_image_pixels: int = 40_000_000
    max_prompt_chars: int = 1000
    max_sdp_bytes: int = 64 * 2**10

    @property
    def max_request_bytes(self) -> int:
        return self.max_image_bytes + self.max_sdp_bytes + 4 * self.max_prompt_chars + 64 * 2**10


@dataclass(frozen=True)
class Offer:
    sdp: str
    prompt: str
    image_bytes: bytes | None
    sample: str | None


async def _read_part(part, limit: int, what: str) -> bytes:
    data = bytearray()
    while True:
        chunk = await part.read_chunk(64 * 2**10)
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > limit:
            raise OfferError(413, "too_large", f"{what} is larger than the limit of {limit:,} bytes")


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise OfferError(400, "bad_field", f"{what} is not UTF-8 text") from None


async def read_offer(request, limits: Limits) -> Offer:
    """Parses and checks the multipart body of POST /api/session."""
    if request.content_type != "multipart/form-data":
        raise OfferError(415, "bad_request", "POST /api/session expects multipart/form-data (sdp, type, prompt, and "
                                             "image or sample)")
    if request.content_length is not None and request.content_length > limits.max_request_bytes:
        raise OfferError(413, "too_large", f"the request ({request.content_length:,} bytes) is larger than the "
                                           f"limit of {limits.max_request_bytes:,} bytes")
    fields: dict[str, bytes] = {}
    try:
        reader = await request.multipart()
        while True:
            part = await reader.next()
            if part is None:
                break
            name = part.name
            if name not in FIELDS:
                raise OfferError(400, "bad_field", f"unexpected form field {str(name)[:40]!r}")
            if name in fields:
                raise OfferError(400, "bad_field", f"form field {name!r} given twice")
            if name == "image":
                declared = (part.headers.get("Content-Type") or "").split(";")[0].strip().lower()
                if declared not in DECLARED_IMAGE_TYPES:
                    raise OfferError(415, "bad_image", f"the uploaded file is {declared!r}; a PNG, JPEG or WebP "
                                                       "image is needed")
                fields[name] = await _read_part(part, limits.max_image_bytes, "the uploaded image")
            elif name == "sdp":
                fields[name] = await _read_part(part, limits.max_sdp_bytes, "the SDP offer")
            else:
                fields[name] = await _read_part(part, 4 * limits.max_prompt_chars + 64, f"field {name!r}")
    except OfferError:
        raise
    except (ValueError, AssertionError, LookupError, RuntimeError) as e:   # aiohttp's reports of broken multipart
        raise OfferError(400, "bad_request", f"malformed multipart body ({type(e).__name__})") from None

    if _text(fields.get("type", b""), "type") != "offer":
        raise OfferError(400, "bad_sdp", "field 'type' must be 'offer'")
    sdp = _text(fields.get("sdp", b""), "the SDP offer")
    if not sdp.startswith("v=0") or "m=" not in sdp:
        raise OfferError(400, "bad_sdp", "field 'sdp' is not an SDP offer (it must start with 'v=0' and hold media "
                                         "sections)")
    prompt = " ".join(_text(fields.get("prompt", b""), "the prompt").split())
    if not prompt:
        raise OfferError(400, "bad_prompt", "the prompt is empty")
    if len(prompt) > limits.max_prompt_chars:
        raise OfferError(400, "bad_prompt", f"the prompt has {len(prompt)} characters; the limit is "
                                            f"{limits.max_prompt_chars}")
    image = fields.get("image")
    sample = _text(fields["sample"], "sample") if "sample" in fields else None
    if (image is None) == (sample is None):
        raise OfferError(400, "bad_image", "give either an uploaded image or a sample name, not both or neither")
    if image is not None and not image:
        raise OfferError(400, "bad_image", "the uploaded image is empty")
    return Offer(sdp=sdp, prompt=prompt, image_bytes=image, sample=sample)


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """Uploaded bytes -> a fully decoded RGB image, or OfferError. Runs off the event loop (decoding takes time)."""
    kind = next((fmt for magic, fmt in IMAGE_SIGNATURES if data.startswith(magic)), None)
    if kind == "WEBP" and data[8:12] != b"WEBP":
        kind = None
    if kind is None:
        raise OfferError(415, "bad_image", "the uploaded file is not a PNG, JPEG or WebP image")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            found = probe.format
    except Exception as e:   # Pillow reports corrupt headers (and decompression bombs) through many types
        raise OfferError(400, "bad_image", f"the uploaded image cannot be read ({type(e).__name__})") from None
    if found != kind:
        raise OfferError(415, "bad_image", f"the uploaded image claims to be {kind} but decodes as {found}")
    if width * height > limits.max_image_pixels:
        raise OfferError(413, "too_large", f"the uploaded image is {width}x{height}; the limit is "
                                           f"{limits.max_image_pixels:,} pixels")
    with tempfile.TemporaryDirectory(prefix="liveavatar-upload-") as folder:
        path = Path(folder) / f"reference.{kind.lower()}"
        path.write_bytes(data)
        try:
            return image_io.load_image(path)
        except image_io.ImageError as e:
            raise OfferError(400, "bad_image", str(e).replace(str(path), "the uploaded image")) from None


def fit_to_geometry(image: Image.Image, height: int, width: int) -> Image.Image:
    """Cover-crops to the server's fixed output size, so every session runs the shapes compiled at start-up (any
    other size would compile anew inside the session)."""
    return ImageOps.fit(image.convert("RGB"), (width, height), method=Image.BILINEAR)
