"""Live serving: an aiohttp + aiortc WebRTC server around `Pipeline.live` (entry point: `python -m infer.serve`)."""
