"""The tiny world's whole training recipe, from nothing to the embedded default's weights, with the project's own
commands: `python -m liveavatar_jax.tinyworld recipe --out RUN [--install]`.

Stages (each one a subprocess running the command a user would type; its output goes to RUN/logs/<stage>.log; a
stage whose outputs exist is skipped, so a killed recipe resumes where it stopped):

  clips      python -m liveavatar_jax.tinyworld clips        procedural clips (faces, speech, the mouth law)
  vae        python -m train.vae (two phases)                configs/tinyworld_vae_images.py (single frames),
                                                             then configs/tinyworld_vae.py (windows); or
                                                             `--vae FILE` copies a trained one
  data       python -m train.preprocess --tiny_vae           latents, spectral audio features, prompt embedding
  teacher    python -m train.pretrain                        configs/tinyworld_teacher.py (bidirectional)
  student    python -m train.pretrain                        configs/tinyworld_student.py (Stage 1, from the teacher)
  distill    python -m train.distill                         configs/tinyworld_distill.py (Stage 2, DMD)
  weights    RUN/weights/{dit,vae,teacher}.safetensors + manifest.json (sizes, sha256, every stage's figures)
  eval       python -m infer.stream + python -m liveavatar_jax.eval on speech no stage trained on
  teacher_eval  the bidirectional teacher sampled clip by clip (sampling/teacher.py) on the same speech
  ablation   (only when asked) RSFM on/off, 2/3/4 steps, TPP, over one 10-minute unseen track

`--install` copies RUN/weights into liveavatar_jax/assets/tinyworld, the folder configs/tiny.py's
`trained_weights` names, so `python -m infer.stream` without --ckpt_dir streams the trained model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "tinyworld"
PROMPT = "A person is talking to the camera."
EVAL_SEED = 900_000          # clip seeds of the evaluation: faces, voices and sentences no training clip has


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    """The recipe's JSON files (figures, rows, manifests): indented, ending with a newline."""
    path.write_text(json.dumps(obj, indent=1) + "\n")


# the figures of `eval.evaluate` every evaluation stage records per clip (or row), in this order
FIGURES = ("sync", "drift_max", "quiet_face_psnr")


def _figures(scored: dict, prefix: str = "") -> dict:
    """`FIGURES` of one `eval.evaluate` result, named `prefix` + figure."""
    values = {"sync": scored["sync"], "drift_max": scored["drift"]["max"], "quiet_face_psnr": scored["quiet_face_psnr"]}
    return {prefix + name: values[name] for name in FIGURES}


def _mean(rows: list[dict], key: str) -> float:
    """The mean of a figure over the evaluation's clips, leaving out the clips where it is undefined (null)."""
    return round(float(np.mean([r[key] for r in rows if r[key] is not None])), 4)


def _last_metrics(workdir: Path) -> dict:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else {}


class Recipe:
    def __init__(self, out, *, clips: int, seconds: float, eval_clips: int, eval_seconds: float,
                 overrides: dict[str, list[str]] | None = None, vae_from=None, log=print):
        """`vae_from`: a trained vae.safetensors the vae stage copies instead of training one (the DiT stages on a
        fixed VAE: the VAE's training is the recipe's longest stage and its least repeatable, docs/tinyworld.md)."""
        self.run = Path(out)
        self.vae_from = None if vae_from is None else Path(vae_from)
        if self.vae_from is not None and not self.vae_from.is_file():
            raise ValueError(f"--vae {self.vae_from}: no such file")
        if (self.vae_from is not None and self.vae_file.is_file()
                and _sha256(self.vae_file) != _sha256(self.vae_from)):
            # the run's data and DiT stages were made on the VAE it has; mixing in another would be silent
            raise ValueError(f"--vae {self.vae_from}: {self.vae_file} already exists and is a different VAE (its data "
                             "and DiT stages were made on it); name a new --out")
        self.clips, self.seconds = clips, seconds
        self.eval_clips, self.eval_seconds = eval_clips, eval_seconds
        self.overrides = overrides or {}
        self.log = log
        self.figures: dict[str, dict] = {}
        self.logs = self.run / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.summary_path = self.run / "recipe.json"
        if self.summary_path.is_file():
            self.figures = json.loads(self.summary_path.read_text()).get("stages", {})

    # -------------------------------------------------------------------------------------------- plumbing

    def _command(self, stage: str, args: list[str]) -> float:
        cmd = [sys.executable, "-m", *args, *self.overrides.get(stage, [])]
        self.log(f"[{stage}] {' '.join(cmd[2:])}")
        t0 = time.perf_counter()
        with open(self.logs / f"{stage}.log", "a") as logf:
            logf.write(f"$ {' '.join(cmd)}\n")
            logf.flush()
            proc = subprocess.run(cmd, cwd=REPO, stdout=logf, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = (self.logs / f"{stage}.log").read_text().splitlines()[-15:]
            raise RuntimeError(f"stage {stage} failed (exit {proc.returncode}); {self.logs / (stage + '.log')} "
                               "ends with:\n  " + "\n  ".join(tail))
        return seconds

    def _record(self, stage: str, **figures):
        self.figures[stage] = {**self.figures.get(stage, {}), **figures}
        _write_json(self.summary_path, {"stages": self.figures})
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
        self.log(f"[{stage}] {shown}")

    def _train(self, stage: str, module: str, config: str, workdir: Path, export: str, extra: list[str],
               data: Path | None = None):
        """Runs one training command on `data` (default: the preprocessed dataset) unless its export exists."""
        if (workdir / export).is_file():
            self.log(f"[{stage}] {workdir / export} exists: skipped")
            return
        seconds = self._command(stage, [module, f"--config={REPO / 'configs' / config}", f"--workdir={workdir}",
                                        f"--config.data.path={data or self.data_dir}", *extra])
        last = _last_metrics(workdir)
        self._record(stage, seconds=round(seconds, 1), **{k: v for k, v in last.items()
                                                          if isinstance(v, (int, float))})

    @property
    def clips_dir(self) -> Path:
        return self.run / "clips"

    @property
    def vae_file(self) -> Path:
        return self.run / "vae" / "vae.safetensors"

    @property
    def data_dir(self) -> Path:
        return self.run / "data"

    @property
    def weights_dir(self) -> Path:
        return self.run / "weights"

    # ---------------------------------------------------------------------------------------------- stages

    def stage_clips(self):
        if len(list(self.clips_dir.glob("*.mp4"))) >= self.clips:
            return
        seconds = self._command("clips", ["liveavatar_jax.tinyworld", "clips", "--count", str(self.clips),
                                          "--seconds", str(self.seconds), "--out", str(self.clips_dir)])
        self._record("clips", seconds=round(seconds, 1), clips=self.clips, clip_seconds=self.seconds)

    def stage_vae(self):
        """Two phases (docs/tinyworld.md, VAE): single frames from random weights, then that export inflated in time
        and trained on 9-frame windows whose frame 0 comes from another clip; the chunks then carry their own
        colours, and a stream keeps them past the window."""
        if self.vae_file.is_file():
            self.log(f"[vae] {self.vae_file} exists: skipped")   # phase 1 is not needed again
            return
        if self.vae_from is not None:
            self.vae_file.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.vae_from, self.vae_file)
            self._record("vae", copied_from=str(self.vae_from.resolve()), sha256=_sha256(self.vae_from))
            return
        images = self.run / "vae_images"
        self._train("vae_images", "train.vae", "tinyworld_vae_images.py", images, "vae.safetensors", [],
                    data=self.clips_dir)
        self._train("vae", "train.vae", "tinyworld_vae.py", self.vae_file.parent, self.vae_file.name,
                    [f"--config.init_from={images / 'vae.safetensors'}"], data=self.clips_dir)

    def stage_data(self):
        from configs import tinyworld_teacher

        if (self.data_dir / "index.json").is_file():
            return
        seconds = self._command("data", [
            "train.preprocess", "--videos", str(self.clips_dir), "--out", str(self.data_dir),
            "--tiny_vae", str(self.vae_file), "--frames", str(tinyworld_teacher.FRAMES),
            "--height", "64", "--width", "64", "--fps", "25", "--text_len", "32", "--prompt", PROMPT])
        index = json.loads((self.data_dir / "index.json").read_text())
        self._record("data", seconds=round(seconds, 1), examples=len(index["examples"]))

    def stage_teacher(self):
        self._train("teacher", "train.pretrain", "tinyworld_teacher.py", self.run / "teacher", "dit_ema.safetensors",
                    [])

    def stage_student(self):
        self._train("student", "train.pretrain", "tinyworld_student.py", self.run / "student", "dit_ema.safetensors",
                    [f"--config.model.checkpoint={self.run / 'teacher' / 'dit_ema.safetensors'}"])

    def stage_distill(self):
        self._train("distill", "train.distill", "tinyworld_distill.py", self.run / "distill",
                    "student_dit_ema.safetensors",
                    [f"--config.model.checkpoint={self.run / 'teacher' / 'dit_ema.safetensors'}",
                     f"--config.distill.init_student={self.run / 'student' / 'dit_ema.safetensors'}"])

    def stage_weights(self):
        from liveavatar_jax.pipeline import TRAINED_DIT, TRAINED_VAE

        self.weights_dir.mkdir(parents=True, exist_ok=True)
        sources = {TRAINED_DIT: self.run / "distill" / "student_dit_ema.safetensors",
                   TRAINED_VAE: self.vae_file,
                   "teacher.safetensors": self.run / "teacher" / "dit_ema.safetensors"}
        files = {}
        for name, src in sources.items():
            shutil.copyfile(src, self.weights_dir / name)
            files[name] = {"bytes": src.stat().st_size, "sha256": _sha256(src), "from": str(src.relative_to(self.run))}
        manifest = {"recipe": "python -m liveavatar_jax.tinyworld recipe", "files": files, "stages": self.figures}
        _write_json(self.weights_dir / "manifest.json", manifest)
        self._record("weights", megabytes=round(sum(f["bytes"] for f in files.values()) / 1e6, 2))

    def stage_eval(self, steps: int = 4, name: str = "eval", extra: list[str] | None = None) -> dict:
        """Streams the student on `eval_clips` clips whose seeds no training clip used (new faces, voices and
        sentences) and scores them; also scores the clips' ground-truth renders, the reference figures."""
        from liveavatar_jax.eval import evaluate

        out = self.run / name
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(self.eval_clips):
            seed = EVAL_SEED + i
            gt = out / f"truth_{seed}.mp4"
            if not gt.is_file():
                self._command(name, ["liveavatar_jax.tinyworld", "clip", "--seed", str(seed), "--seconds",
                                     str(self.eval_seconds), "--out", str(gt)])
            gen = out / f"student_{seed}.mp4"
            if not gen.is_file():
                self._command(name, ["infer.stream", "--image", str(gt.with_suffix(".png")), "--audio",
                                     str(gt.with_suffix(".wav")), "--out", str(gen), "--steps", str(steps),
                                     f"--config.trained_weights={self.weights_dir}", *(extra or [])])
            row = {"seed": seed}
            for kind, video in (("student", gen), ("truth", gt)):
                row.update(_figures(evaluate(video, gt.with_suffix(".wav"), gt.with_suffix(".png")), f"{kind}_"))
            rows.append(row)
        figures = {"clips": len(rows), "seconds_each": self.eval_seconds, "steps": steps,
                   **{f"{kind}_{metric}": _mean(rows, f"{kind}_{metric}")
                      for metric in FIGURES for kind in ("student", "truth")}}
        _write_json(out / "rows.json", rows)
        self._record(name, **figures)
        return figures

    def stage_teacher_eval(self, steps: int = 20, guidance: float = 3.0) -> dict:
        """The bidirectional teacher on the evaluation clips, sampled clip by clip (`sampling.teacher`) with the
        guidance it has as Stage 2's real score, through the same VAE and trimming as a stream."""
        from configs import tiny, tinyworld_teacher
        from liveavatar_jax.eval import evaluate
        from liveavatar_jax.pipeline import Pipeline, plan_stream
        from liveavatar_jax.sampling.teacher import sample_teacher_frames
        from liveavatar_jax.tinyworld.clips import write_mp4
        from liveavatar_jax.io.audio import load_audio
        from liveavatar_jax.weights.dit_keys import load_dit

        out = self.run / "eval"
        config = tiny.get_config()
        config.trained_weights = str(self.weights_dir)
        pipe = Pipeline(config)
        teacher = load_dit(self.weights_dir / "teacher.safetensors", pipe.models.dit.cfg)
        rows = []
        for i in range(self.eval_clips):
            seed = EVAL_SEED + i
            gt = out / f"truth_{seed}.mp4"
            video = out / f"teacher_{seed}.mp4"
            if not video.is_file():
                plan, image = plan_stream(config, gt.with_suffix(".png"), gt.with_suffix(".wav"))
                prepared = pipe.prepare(image, gt.with_suffix(".wav"), PROMPT, plan=plan)
                frames = sample_teacher_frames(pipe, teacher, prepared, PROMPT, frames=tinyworld_teacher.FRAMES,
                                               steps=steps, shift=pipe.stream_cfg.shift, guidance=guidance, seed=seed)
                frames = frames[plan.drop_first_frames: plan.drop_first_frames + plan.video_frames]
                write_mp4(video, frames, load_audio(gt.with_suffix(".wav")))
            scored = evaluate(video, gt.with_suffix(".wav"), gt.with_suffix(".png"))
            rows.append({"seed": seed, **_figures(scored, "teacher_")})
        figures = {"clips": len(rows), "sampling_steps": steps, "guidance": guidance,
                   **{f"teacher_{metric}": _mean(rows, f"teacher_{metric}") for metric in FIGURES}}
        self._record("teacher_eval", **figures)
        return figures

    # name -> infer.stream arguments of one row of the ablation table (docs/tinyworld.md)
    ABLATIONS = {
        "4 steps, RSFM on (default: rolling RoPE, no AAS)": [],
        "4 steps, RSFM with AAS (the sink replaced before block 4, as the official)": [
            "--config.stream.sink_replace_block=4"],
        "4 steps, RSFM off": ["--config.stream.rolling_sink=False", "--config.stream.sink_replace_block=None"],
        "3 steps": ["--steps", "3"],
        "2 steps": ["--steps", "2"],
        "4 steps, TPP 4+1 (simulated devices)": ["--tpp", "--cpu_devices", "5"],
    }

    def stage_ablation(self, seconds: float = 600.0) -> dict:
        """Every row of ABLATIONS streamed over one long unseen track: sync, colour drift and steady fps."""
        from liveavatar_jax.eval import evaluate

        out = self.run / "ablation"
        out.mkdir(parents=True, exist_ok=True)
        seed = EVAL_SEED + 100
        gt = out / f"truth_{seed}.mp4"
        if not gt.is_file():
            self._command("ablation", ["liveavatar_jax.tinyworld", "clip", "--seed", str(seed), "--seconds",
                                       str(seconds), "--out", str(gt)])
        rows = {}
        for i, (name, extra) in enumerate(self.ABLATIONS.items()):
            video = out / f"row{i}.mp4"
            summary_path = video.with_suffix(".json")
            if not summary_path.is_file():
                args = ["infer.stream", "--image", str(gt.with_suffix(".png")), "--audio", str(gt.with_suffix(".wav")),
                        "--out", str(video), f"--config.trained_weights={self.weights_dir}", *extra]
                res = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True)
                (self.logs / "ablation.log").open("a").write(f"$ {' '.join(args)}\n{res.stderr[-3000:]}\n")
                if res.returncode != 0:
                    raise RuntimeError(f"ablation row {name!r} failed: {res.stderr.strip()[-800:]}")
                summary_path.write_text(res.stdout.strip().splitlines()[-1])
            summary = json.loads(summary_path.read_text())
            scored = evaluate(video, gt.with_suffix(".wav"), gt.with_suffix(".png"))
            rows[name] = {"command": "python -m infer.stream --image IMG --audio AUDIO --out OUT "
                                     + " ".join(extra),
                          **_figures(scored),
                          "drift_face_per_minute": scored["drift"].get("face_per_minute"),
                          "steady_fps": summary.get("steady_fps")}
            self.log(f"[ablation] {name}: {rows[name]}")
        truth = evaluate(gt, gt.with_suffix(".wav"), gt.with_suffix(".png"))
        rows["ground truth render"] = _figures(truth)
        _write_json(out / "table.json", rows)
        self._record("ablation", seconds_of_audio=seconds, rows=len(rows))
        return rows

    def install(self):
        """Copies the DiT and VAE into the package's assets with the manifest, whose figures are brought up to date
        (the evaluations run after the weights stage wrote it)."""
        from liveavatar_jax.pipeline import TRAINED_DIT, TRAINED_VAE

        ASSETS.mkdir(parents=True, exist_ok=True)
        for name in (TRAINED_DIT, TRAINED_VAE):
            shutil.copyfile(self.weights_dir / name, ASSETS / name)
        manifest = json.loads((self.weights_dir / "manifest.json").read_text())
        manifest["files"] = {k: v for k, v in manifest["files"].items() if k in (TRAINED_DIT, TRAINED_VAE)}
        manifest["stages"] = self.figures
        _write_json(ASSETS / "manifest.json", manifest)
        self.log(f"[install] {ASSETS}")

    STAGES = ("clips", "vae", "data", "teacher", "student", "distill", "weights", "eval", "teacher_eval", "ablation")
    DEFAULT_STAGES = STAGES[:-1]     # what `recipe` runs unless told: all but the ablation

    def __call__(self, stages=DEFAULT_STAGES, install: bool = False):
        t0 = time.perf_counter()
        for stage in stages:
            getattr(self, f"stage_{stage}")()
        if tuple(stages) == self.DEFAULT_STAGES:
            # the whole recipe's time; a later partial call (the ablation, an install) must not overwrite it
            self._record("recipe", seconds=round(time.perf_counter() - t0, 1))
        if install:
            self.install()
        return self.figures
