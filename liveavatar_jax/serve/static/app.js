// The LiveAvatar page: sends the microphone (or an audio file) and a reference image over WebRTC, shows the avatar
// video that comes back, and measures time to first frame, fps, dropped frames and the A/V offset.
// `window.liveavatar` holds the live state (the browser tests read it).
'use strict';

const $ = (id) => document.getElementById(id);

const REASONS = {
  audio_ended: 'the audio ended', audio_track_ended: 'the audio track ended', client_stopped: 'you stopped it',
  connection_lost: 'the connection was lost', connection_closed: 'the connection closed',
  connect_timeout: 'the connection could not be set up in time', time_limit: 'the session time limit was reached',
  failed: 'the pipeline failed', server_shutdown: 'the server is shutting down', bad_offer: 'the offer was rejected',
};

const state = {
  status: 'idle', config: null, sessionId: null, message: null, refusal: null,
  image: { sample: null, file: null },
  pc: null, dc: null, localStream: null, audioCtx: null, audioEl: null, statsTimer: null,
  startedAt: 0, phases: {}, ttffS: null, serverTtffS: null, framesShown: 0, fps: null, frameTimes: [],
  lateFrames: 0, framesDecoded: 0, framesDropped: 0, avOffsetMs: null, jitterBufferMs: null,
};
window.liveavatar = state;

function setStatus(status, text) {
  state.status = status;
  $('status').textContent = text || status;
  const running = ['connecting', 'streaming', 'finishing'].includes(status);
  $('start').disabled = running || !(state.config && state.config.ready);
  $('stop').disabled = !running;
}

function showMessage(text, kind) {
  state.message = text ? { text, kind: kind || 'info' } : null;
  const box = $('message');
  box.hidden = !text;
  box.textContent = text || '';
  box.className = 'message' + (kind ? ' ' + kind : '');
}

function fmt(value, digits, unit) {
  return value === null || value === undefined ? '–' : value.toFixed(digits) + (unit || '');
}

function render() {
  $('stat-ttff').textContent = fmt(state.ttffS, 2, ' s');
  $('stat-ttff-server').textContent = fmt(state.serverTtffS, 2, ' s');
  $('stat-fps').textContent = fmt(state.fps, 1);
  $('stat-frames').textContent = String(state.framesShown);
  $('stat-late').textContent = String(state.lateFrames);
  $('stat-dropped').textContent = String(state.framesDropped);
  $('stat-av').textContent = fmt(state.avOffsetMs, 0, ' ms');
}

// ---------------------------------------------------------------------------------------------------- set-up

async function loadConfig() {
  try {
    const resp = await fetch('/api/config');
    state.config = await resp.json();
  } catch (err) {
    $('server-info').textContent = 'The server cannot be reached.';
    setTimeout(loadConfig, 2000);
    return;
  }
  const c = state.config;
  $('server-info').textContent = `Output ${c.width}×${c.height} at ${c.fps} fps · up to ${c.max_sessions} ` +
    `session(s)` + (c.random_weights ? ' · embedded default with random weights: expect noise, not a face' : '') +
    (c.ready ? '' : ' · compiling the pipeline, Start is enabled when it is ready');
  if (!$('samples').childElementCount) {
    for (const name of c.samples) addSample(name);
    if (c.samples.length) chooseSample(c.samples[0]);
  }
  setStatus(state.status, $('status').textContent);
  if (!c.ready) setTimeout(loadConfig, 1000);
}

function addSample(name) {
  const button = document.createElement('button');
  button.type = 'button';
  button.setAttribute('role', 'radio');
  button.dataset.sample = name;
  button.title = name;
  const img = document.createElement('img');
  img.src = '/samples/' + encodeURIComponent(name);
  img.alt = 'sample ' + name;
  button.appendChild(img);
  button.addEventListener('click', () => chooseSample(name));
  $('samples').appendChild(button);
}

function chooseSample(name) {
  state.image = { sample: name, file: null };
  for (const b of $('samples').children) b.setAttribute('aria-checked', String(b.dataset.sample === name));
  $('preview').src = '/samples/' + encodeURIComponent(name);
  $('image-file').value = '';
}

function chooseUpload() {
  const file = $('image-file').files[0];
  if (!file) return;
  const limit = state.config ? state.config.max_image_bytes : Infinity;
  if (!['image/png', 'image/jpeg', 'image/webp'].includes(file.type)) {
    showMessage(`${file.name} is not a PNG, JPEG or WebP image.`, 'error');
    $('image-file').value = '';
    return;
  }
  if (file.size > limit) {
    showMessage(`${file.name} is ${(file.size / 2 ** 20).toFixed(1)} MB; the limit is ` +
      `${(limit / 2 ** 20).toFixed(1)} MB.`, 'error');
    $('image-file').value = '';
    return;
  }
  showMessage(null);
  state.image = { sample: null, file };
  for (const b of $('samples').children) b.setAttribute('aria-checked', 'false');
  $('preview').src = URL.createObjectURL(file);
}

// ---------------------------------------------------------------------------------------------------- session

async function speechTrack() {
  if ($('src-file').checked) {
    const file = $('audio-file').files[0];
    if (!file) throw new Error('Choose an audio file first (or pick the microphone).');
    const ctx = new AudioContext();
    const el = new Audio();
    el.src = URL.createObjectURL(file);
    const dest = ctx.createMediaStreamDestination();
    ctx.createMediaElementSource(el).connect(dest);
    el.addEventListener('ended', () => {
      send({ type: 'end' });
      if (state.status === 'streaming') setStatus('finishing', 'finishing: the last blocks are on their way');
    });
    el.addEventListener('error', () => fail('The browser cannot play this audio file.'));
    state.audioCtx = ctx;
    state.audioEl = el;
    state.localStream = dest.stream;
    return dest.stream.getAudioTracks()[0];
  }
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false, channelCount: 1 },
  });
  state.localStream = stream;
  return stream.getAudioTracks()[0];
}

function gatheringDone(pc, timeoutMs) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, timeoutMs);
    pc.addEventListener('icegatheringstatechange', () => {
      if (pc.iceGatheringState === 'complete') { clearTimeout(timer); resolve(); }
    });
  });
}

function resetStats() {
  Object.assign(state, {
    sessionId: null, refusal: null, phases: {}, ttffS: null, serverTtffS: null, framesShown: 0, fps: null, frameTimes: [],
    lateFrames: 0, framesDecoded: 0, framesDropped: 0, avOffsetMs: null, jitterBufferMs: null,
  });
  render();
}

async function start() {
  if (state.pc) return;
  resetStats();
  showMessage(null);
  setStatus('connecting', 'connecting…');
  state.startedAt = performance.now();
  try {
    const track = await speechTrack();
    mark('audio_source');
    const pc = new RTCPeerConnection({ iceServers: [] });
    state.pc = pc;
    pc.addTransceiver(track, { direction: 'sendrecv', streams: [state.localStream] });
    pc.addTransceiver('video', { direction: 'recvonly' });
    const dc = pc.createDataChannel('control');
    state.dc = dc;
    dc.addEventListener('message', (e) => onControl(e.data));
    const remote = new MediaStream();
    pc.addEventListener('track', (e) => {
      remote.addTrack(e.track);
      $('video').srcObject = remote;
    });
    pc.addEventListener('connectionstatechange', () => {
      if (pc !== state.pc) return;
      if (pc.connectionState === 'connected') {
        mark('connected');
        setStatus('streaming', 'streaming: waiting for the first frame…');
        if (state.audioEl) state.audioEl.play().catch((err) => fail('The audio file cannot be played: ' + err));
      } else if (pc.connectionState === 'failed') {
        fail('The connection to the server failed.');
      }
    });
    await pc.setLocalDescription(await pc.createOffer());
    await gatheringDone(pc, 3000);
    mark('offer_ready');

    const form = new FormData();
    form.append('type', 'offer');
    form.append('sdp', pc.localDescription.sdp);
    form.append('prompt', $('prompt').value);
    if (state.image.file) form.append('image', state.image.file, 'reference');
    else form.append('sample', state.image.sample || '');
    const resp = await fetch('/api/session', { method: 'POST', body: form });
    let body;
    try { body = await resp.json(); } catch (err) { body = { message: `The server answered HTTP ${resp.status}.` }; }
    if (pc !== state.pc) return;    // stopped meanwhile
    if (!resp.ok) {
      state.refusal = { status: resp.status, error: body.error, message: body.message };
      teardown();
      const busy = resp.status === 503;
      setStatus(busy ? 'busy' : 'error', busy ? 'server busy' : 'refused');
      showMessage(body.message || `The server refused the session (HTTP ${resp.status}).`, busy ? 'busy' : 'error');
      return;
    }
    state.sessionId = body.session_id;
    mark('answered');
    await pc.setRemoteDescription({ type: body.type, sdp: body.sdp });
    watchFrames(pc);
    state.statsTimer = setInterval(() => pollStats(pc), 1000);
  } catch (err) {
    fail(err && err.message ? err.message : String(err));
  }
}

// Seconds since Start at which each step of the set-up finished: where the time to first frame goes.
function mark(phase) {
  state.phases[phase] = (performance.now() - state.startedAt) / 1000;
}

function watchFrames(pc) {
  const video = $('video');
  if (!('requestVideoFrameCallback' in HTMLVideoElement.prototype)) return;
  const onFrame = (now, meta) => {
    if (pc !== state.pc) return;
    if (state.ttffS === null) {
      state.ttffS = (now - state.startedAt) / 1000;
      if (state.status === 'streaming') setStatus('streaming', 'streaming');
    }
    state.framesShown = meta.presentedFrames;
    state.frameTimes.push(now);
    while (state.frameTimes.length && now - state.frameTimes[0] > 2000) state.frameTimes.shift();
    if (state.frameTimes.length > 1) {
      state.fps = (state.frameTimes.length - 1) / ((now - state.frameTimes[0]) / 1000);
    }
    render();
    video.requestVideoFrameCallback(onFrame);
  };
  video.requestVideoFrameCallback(onFrame);
}

async function pollStats(pc) {
  if (pc !== state.pc) return;
  let video = null, audio = null;
  try {
    (await pc.getStats()).forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video') video = s;
      if (s.type === 'inbound-rtp' && s.kind === 'audio') audio = s;
    });
  } catch (err) { return; }
  if (video) {
    state.framesDecoded = video.framesDecoded || 0;
    state.framesDropped = video.framesDropped || 0;
    if (video.jitterBufferEmittedCount) {
      state.jitterBufferMs = 1000 * video.jitterBufferDelay / video.jitterBufferEmittedCount;
    }
  }
  // Both receivers report which sender instant (NTP) they are playing now; the difference is the A/V offset as
  // heard and seen (positive: the audio is ahead). Only meaningful once video frames have been played.
  if (video && audio && video.estimatedPlayoutTimestamp && audio.estimatedPlayoutTimestamp && state.ttffS !== null) {
    state.avOffsetMs = audio.estimatedPlayoutTimestamp - video.estimatedPlayoutTimestamp;
  }
  render();
  const report = { type: 'client_stats', frames_decoded: state.framesDecoded, frames_dropped: state.framesDropped };
  if (state.ttffS !== null) report.ttff_s = state.ttffS;
  if (state.fps !== null) report.fps = state.fps;
  if (state.avOffsetMs !== null) report.av_offset_ms = state.avOffsetMs;
  if (state.jitterBufferMs !== null) report.jitter_buffer_ms = state.jitterBufferMs;
  send(report);
}

function onControl(data) {
  let msg;
  try { msg = JSON.parse(data); } catch (err) { return; }
  if (msg.type === 'stats') {
    state.lateFrames = msg.late_frames;
    render();
  } else if (msg.type === 'first_frame') {
    state.serverTtffS = msg.from_first_audio_s;
    render();
  } else if (msg.type === 'error') {
    fail(msg.message);
  } else if (msg.type === 'ended') {
    if (state.status === 'failed') return;
    const why = REASONS[msg.reason] || msg.reason;
    teardown();
    setStatus('ended', 'ended');
    showMessage(msg.reason === 'failed' ? `The session failed: ${msg.message || why}.` : `Session ended: ${why}.`,
      msg.reason === 'failed' ? 'error' : 'info');
  }
}

function send(message) {
  const dc = state.dc;
  if (dc && dc.readyState === 'open') dc.send(JSON.stringify(message));
}

function fail(text) {
  teardown();
  setStatus('failed', 'failed');
  showMessage(text, 'error');
}

function teardown() {
  if (state.statsTimer) clearInterval(state.statsTimer);
  state.statsTimer = null;
  if (state.audioEl) state.audioEl.pause();
  if (state.audioCtx) state.audioCtx.close().catch(() => {});
  if (state.localStream) state.localStream.getTracks().forEach((t) => t.stop());
  if (state.dc) state.dc.close();
  if (state.pc) state.pc.close();
  Object.assign(state, { pc: null, dc: null, audioCtx: null, audioEl: null, localStream: null });
}

function stop() {
  send({ type: 'stop' });
  teardown();
  setStatus('stopped', 'stopped');
}

document.addEventListener('DOMContentLoaded', () => {
  $('start').addEventListener('click', start);
  $('stop').addEventListener('click', stop);
  $('image-file').addEventListener('change', chooseUpload);
  $('audio-file').addEventListener('change', () => { $('src-file').checked = true; });
  window.addEventListener('pagehide', () => { if (state.pc) stop(); });
  render();
  loadConfig();
});
