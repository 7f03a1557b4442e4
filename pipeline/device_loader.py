"""Batches decoded and augmented on the training device (`data.decode: gpu`), fed from the same shards.

`make_train_loader(cfg, device=...)` / `make_eval_loader(cfg, device=...)` in pipeline/loader.py
build these when `data.decode` resolves to "gpu" (`resolve_decode`); a training script never
builds them directly. They keep everything the CPU loader guarantees, because they *are* the CPU
loader with two methods replaced: the shard order, the slices of ranks and workers, equal steps on
every rank, the refilling of bad samples and the (epoch, steps) resume state are its code.

What runs where:

- DataLoader workers only read: each batch's JPEG members go to the training process as one
  block of bytes in shared memory (pinned by the DataLoader on CUDA) with their sizes, read from
  the JPEG header (`pipeline.images.check_image`, which also rejects truncated files). Members
  that are not JPEG (PNG, WebP, BMP, TIFF...), and JPEGs that the image-mode policy changes (CMYK,
  EXIF-rotated: `ImageInfo.conversions`), are decoded in the worker by the CPU loader's own decoder
  (Pillow, `pipeline.transforms.decode_image`) and travel as pixels.
- The training process decodes the batch's JPEGs in one call on the device,
  `torchvision.io.decode_jpeg(list, device=...)` (nvJPEG on CUDA, using the GPU's hardware JPEG
  engines where it has them), then crops, resizes, flips and normalises the whole batch with a
  few tensor ops: every sample's RandomResizedCrop box is drawn from a generator seeded per batch
  by (seed, epoch, rank, worker, batch), as the CPU loader seeds its augmentation, and the boxes
  are resampled to the output size by `torchvision.ops.roi_align`, one call per group of
  similarly sized images (bilinear, averaging
  ceil(box / output) samples per output pixel, so shrinking is antialiased). The same boxes give
  the same pixels after a resume. Mixup/CutMix and label smoothing are pipeline/transforms.py's
  `BatchMixer`, run on the device batch under the same per-batch seed. The batch reaches the
  step on the device, in the step's input dtype: there is no host copy of the pixels.
- A JPEG that the device decoder refuses (an unusual layout) is decoded with Pillow on the
  CPU instead, counted in `stats["decoded_on_cpu"]`; one that nothing decodes is skipped,
  reported and its slot refilled, as on the CPU path.
- torchvision's GPU decode holds its calling thread until the batch is decoded, so training
  batches are decoded two ahead in a background thread, on a CUDA stream of its own, while the
  step runs; only what draws from torch's global RNG (RandAugment, Mixup/CutMix) runs in the
  training thread. Progressive JPEGs are decoded by nvJPEG one by one (slower than baseline ones,
  which go through the hardware decoder in one batch).

The pixels differ slightly from the CPU path's (another JPEG decoder and resampling filter; the
CPU path also decodes large JPEGs at a reduced scale): the augmentation is the same distribution,
not the same bits. RandAugment, when on, runs per image on the device.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Iterator

import torch
from torch.utils.data import get_worker_info

from pipeline.images import check_image
from pipeline.loader import (EvalLoader, TrainLoader, _decode_label, _drain, _EvalStream, _failure, _RawSample,
                             _seed, _TrainStream)
from pipeline.transforms import decode_image
from vitpipe.errors import UserError

__all__ = ["resolve_decode", "device_decode_available", "random_resized_crop_boxes", "center_crop_boxes",
           "crop_resize", "DeviceTrainLoader", "DeviceEvalLoader"]

log = logging.getLogger(__name__)

_TRIALS = 10  # RandomResizedCrop's attempts before it falls back to a center crop (as torchvision)
_MAX_PIXELS = 1 << 31  # bombs are refused when sharding (--max-image-pixels); this only bounds the header check
# The crops are resampled from the batch's images padded to a common size, in groups of at most
# this many bytes of float32, so a few large photos do not make one huge padded tensor.
_PAD_BUDGET = 256 << 20


# ---------------------------------------------------------------------------------------------
# Choosing the path


@functools.lru_cache(maxsize=None)
def device_decode_available(device: torch.device) -> str | None:
    """None when torchvision decodes JPEGs on `device`; else why not, in a few words."""
    from torchvision.io import decode_jpeg, encode_jpeg

    try:
        probe = encode_jpeg(torch.full((3, 16, 16), 128, dtype=torch.uint8))
        decode_jpeg([probe], device=device)
    except Exception as e:  # a CPU-only torchvision build, no nvJPEG, a driver problem
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None


def resolve_decode(decode: str, device: torch.device) -> str:
    """data.decode -> "cpu" (Pillow in the loader's workers) or "gpu" (on `device`).

    auto: gpu when training on CUDA and torchvision can decode JPEGs there, else cpu. gpu on a
    CPU device runs the device path in the training process (what the tests do).
    """
    if decode == "cpu" or (decode == "auto" and device.type != "cuda"):
        return "cpu"
    if device.type != "cuda":
        log.info(f"data.decode=gpu on {device}: batches are decoded in the training process")
        return "gpu"
    why = device_decode_available(device)
    if why is None:
        return "gpu"
    if decode == "auto":
        log.warning(f"data.decode=auto: decoding on the CPU, torchvision cannot decode JPEGs on {device} ({why})")
        return "cpu"
    raise UserError(f"data.decode=gpu: torchvision cannot decode JPEGs on {device} ({why}); install a CUDA "
                    f"build of torchvision (it ships nvJPEG), or set data.decode cpu")


# ---------------------------------------------------------------------------------------------
# Crop geometry, for whole batches


def draw_crop_uniforms(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-sample randomness of a batch: crop trials [n, TRIALS, 4], flip [n] and refill [n]
    uniforms in [0, 1), drawn in this order from `generator`."""
    trials = torch.rand(n, _TRIALS, 4, generator=generator, dtype=torch.float64)
    return trials, torch.rand(n, generator=generator), torch.rand(n, generator=generator)


def random_resized_crop_boxes(sizes: torch.Tensor, trials: torch.Tensor, scale: tuple[float, float],
                              ratio: tuple[float, float]) -> torch.Tensor:
    """RandomResizedCrop boxes (x1, y1, x2, y2) in pixels, float [n, 4], for images of `sizes`
    (h, w) [n, 2], from uniforms `trials` [n, T, 4] (area, log aspect, top, left).

    torchvision's rule, vectorised: the first of T trials whose box fits the image, else a center
    crop of the whole image with its aspect clamped to `ratio`.
    """
    h_img, w_img = sizes[:, :1].double(), sizes[:, 1:].double()
    area = h_img * w_img * (scale[0] + trials[..., 0] * (scale[1] - scale[0]))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + trials[..., 1] * (log_hi - log_lo))
    w, h = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (h > 0) & (w <= w_img) & (h <= h_img)
    top = torch.floor(trials[..., 2] * (h_img - h + 1))
    left = torch.floor(trials[..., 3] * (w_img - w + 1))
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first trial that fits (0 when none does)
    w, h, top, left = (t.gather(1, first)[:, 0] for t in (w, h, top, left))
    # fallback: the whole image, cut to the nearest allowed aspect
    h_img, w_img = h_img[:, 0], w_img[:, 0]
    in_ratio = w_img / h_img
    fw = torch.where(in_ratio > ratio[1], torch.round(h_img * ratio[1]), w_img)
    fh = torch.where(in_ratio < ratio[0], torch.round(w_img / ratio[0]), h_img)
    ok = fits.any(1)
    w, h = torch.where(ok, w, fw), torch.where(ok, h, fh)
    top = torch.where(ok, top, torch.floor((h_img - h) / 2))
    left = torch.where(ok, left, torch.floor((w_img - w) / 2))
    return torch.stack([left, top, left + w, top + h], 1).float()


def center_crop_boxes(sizes: torch.Tensor, image_size: int, crop_pct: float) -> torch.Tensor:
    """The evaluation transform (shorter side resized to image_size / crop_pct, center crop of
    image_size, as pipeline.transforms.eval_transform) as boxes in source pixels, float [n, 4]."""
    resize = math.floor(image_size / crop_pct + 1e-6)
    out = []
    for h, w in sizes.tolist():
        # torchvision's Resize(int): the shorter side becomes `resize`, the longer one is truncated
        nh, nw = (int(resize * h / w), resize) if w <= h else (resize, int(resize * w / h))
        top, left = int(round((nh - image_size) / 2.0)), int(round((nw - image_size) / 2.0))
        sy, sx = h / nh, w / nw
        out.append([left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy])
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)


def crop_resize(images: list[torch.Tensor], boxes: torch.Tensor, size: int, *, out: torch.Tensor) -> torch.Tensor:
    """Resample box i of uint8 image i [C, H_i, W_i] to `size` x `size` into out[i] (float, 0-255).

    One `roi_align` per group of similarly sized images padded to a common size. The padding
    repeats each image's last row and column once, so bilinear samples at the border read the
    edge, as an unpadded image would, and never the padding.
    """
    from torchvision.ops import roi_align

    n = len(images)
    order = sorted(range(n), key=lambda i: images[i].shape[1] * images[i].shape[2])
    boxes = boxes.to(out.device, torch.float32)
    start = 0
    while start < n:
        c = images[order[start]].shape[0]
        hm, wm, end = 0, 0, start
        while end < n:
            _, h, w = images[order[end]].shape
            if end > start and (end - start + 1) * c * (max(hm, h) + 1) * (max(wm, w) + 1) * 4 > _PAD_BUDGET:
                break
            hm, wm, end = max(hm, h), max(wm, w), end + 1
        group = order[start:end]
        padded = images[group[0]].new_empty((len(group), c, hm + 1, wm + 1))
        for j, i in enumerate(group):
            img = images[i]
            h, w = img.shape[1:]
            padded[j, :, :h, :w] = img
            padded[j, :, h, :w] = img[:, h - 1]
            padded[j, :, :h + 1, w] = padded[j, :, :h + 1, w - 1]
        index = torch.tensor(group, device=out.device)
        rois = torch.cat([torch.arange(len(group), device=out.device, dtype=torch.float32)[:, None],
                          boxes[index]], 1)
        out[index] = roi_align(padded.float(), rois, (size, size), spatial_scale=1.0, sampling_ratio=-1,
                               aligned=True).to(out.dtype)
        start = end
    return out


# ---------------------------------------------------------------------------------------------
# Worker side: read, do not decode


def _encode(raw: _RawSample, *, mode: str, labelled: bool) -> tuple:
    """One sample for the device: ('jpeg', bytes, (h, w), label) or ('pixels', uint8 [C, H, W], label).

    Raises what the CPU loader's decode would raise for bad data (caught and reported by the caller).
    """
    if raw.image is None:
        raise ValueError("no image member")
    label = _decode_label(raw, labelled)
    info = check_image(raw.image, max_pixels=_MAX_PIXELS)  # BadImage for what is no whole image
    # JPEGs that pipeline/images.to_model_mode would change (CMYK, EXIF-rotated: read from the
    # header) take the CPU loader's decoder, so both paths train on the same upright RGB/L pixels.
    if info.format == "JPEG" and not info.conversions:
        return "jpeg", raw.image, (info.height, info.width), label
    from torchvision.transforms.v2.functional import pil_to_tensor

    return "pixels", pil_to_tensor(decode_image(raw.image, mode=mode)), label


def _shared_bytes(n: int) -> torch.Tensor:
    """An uint8 [n] buffer, in shared memory inside a DataLoader worker (no copy on the way out)."""
    if get_worker_info() is None:
        return torch.empty(n, dtype=torch.uint8)
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(n, device="cpu")
    return torch.empty(0, dtype=torch.uint8).new(storage)


def _pack(slots: list[tuple | None], raws: list[_RawSample], **extra: Any) -> dict:
    """A batch of encoded slots (None: failed in the worker) as tensors the DataLoader can move."""
    jpegs = [(i, s) for i, s in enumerate(slots) if s is not None and s[0] == "jpeg"]
    pixels = [(i, s) for i, s in enumerate(slots) if s is not None and s[0] == "pixels"]
    lengths = [len(s[1]) for _, s in jpegs]
    data = _shared_bytes(sum(lengths))
    view, at = data.numpy(), 0
    for (_, s), n in zip(jpegs, lengths):
        view[at:at + n] = memoryview(s[1])
        at += n
    return {"jpeg": data, "jpeg_lengths": lengths, "jpeg_slots": [i for i, _ in jpegs],
            "jpeg_sizes": [s[2] for _, s in jpegs],
            "pixels": [s[1] for _, s in pixels], "pixel_slots": [i for i, _ in pixels],
            "labels": [-1 if s is None else s[-1] for s in slots],
            "keys": [r.key for r in raws], "shards": [r.shard for r in raws],
            "ok": [s is not None for s in slots], **extra}


class _EncodedTrainStream(_TrainStream):
    """The CPU loader's training stream, its batches left encoded (see the module docstring)."""

    def _batch(self, stream: Iterator[_RawSample], events: list[dict], epoch: int, k: int, m: int) -> dict:
        raws, slots = [], []
        for _ in range(self.cfg.batch_size):
            raw = next(stream)
            raws.append(raw)
            try:
                slots.append(_encode(raw, mode=self.mode, labelled=self.labelled))
            except Exception as e:  # as the CPU loader: any decoder error is one bad sample
                events.append(_failure(raw, e))
                slots.append(None)
        return _pack(slots, raws, seed=_seed(self.seed, epoch, self.rank, k, m))


class _EncodedEvalStream(_EvalStream):
    """The CPU loader's evaluation stream (contiguous ranges, index order), left encoded."""

    def _item(self, raw: _RawSample) -> tuple:
        return _encode(raw, mode=self.mode, labelled=self.labelled), raw

    def _batch(self, items: list, events: list[dict]) -> dict:
        return {**_pack([s for s, _ in items], [r for _, r in items]), "events": _drain(events)}


# ---------------------------------------------------------------------------------------------
# Training process: decode and augment on the device


class _DeviceDecoder:
    """Decodes a packed batch on one device; JPEGs the device refuses go through Pillow."""

    def __init__(self, device: torch.device, channels: int):
        from torchvision.io import ImageReadMode

        self.device = device
        self.read_mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
        self.pil_mode = "RGB" if channels == 3 else "L"
        self.on_cpu = 0  # samples Pillow decoded: not JPEG, or JPEGs the device decoder refused

    def __call__(self, batch: dict, events: list[dict]) -> list[torch.Tensor | None]:
        """uint8 [C, H, W] on the device per slot; None where the sample is bad (reported in events)."""
        n = len(batch["ok"])
        images: list[torch.Tensor | None] = [None] * n
        if batch["jpeg_slots"]:
            parts = list(torch.split(batch["jpeg"], batch["jpeg_lengths"]))
            for slot, img in zip(batch["jpeg_slots"], self._decode_jpegs(parts)):
                if isinstance(img, Exception):
                    events.append(_failure(_RawSample(batch["keys"][slot], batch["shards"][slot], None, None), img))
                else:
                    images[slot] = img
        for slot, pixels in zip(batch["pixel_slots"], batch["pixels"]):  # decoded by Pillow in the worker
            images[slot] = pixels.to(self.device, non_blocking=True)
        self.on_cpu += len(batch["pixel_slots"])
        return images

    def _decode_jpegs(self, parts: list[torch.Tensor]) -> list[torch.Tensor | Exception]:
        from torchvision.io import decode_jpeg

        if self.device.type == "cuda":
            # nvJPEG writes from a stream of its own into memory allocated on ours: memory that the
            # last batch's crops (queued on ours) freed must not be overwritten before they ran.
            # In the decode-ahead thread this waits for those small kernels only.
            torch.cuda.current_stream(self.device).synchronize()
        try:
            return list(decode_jpeg(parts, mode=self.read_mode, device=self.device))
        except RuntimeError:  # one bad image fails the whole call: find it, decode the others
            out: list[torch.Tensor | Exception] = []
            for part in parts:
                try:
                    out.append(decode_jpeg(part, mode=self.read_mode, device=self.device))
                except RuntimeError:
                    out.append(self._pillow(part))
            return out

    def _pillow(self, part: torch.Tensor) -> torch.Tensor | Exception:
        from torchvision.transforms.v2.functional import pil_to_tensor

        try:
            img = pil_to_tensor(decode_image(part.numpy().tobytes(), mode=self.pil_mode))
        except Exception as e:  # corrupt: the caller reports it
            return e
        self.on_cpu += 1
        return img.to(self.device, non_blocking=True)


def _normalizer(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    # (x / 255 - mean) / std as one multiply and one subtract, as pipeline.transforms.normalize_batch
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(mean, std)], device=device).view(1, -1, 1, 1)
    return scale, shift


class _DecodeAhead:
    """Iterate `loader` with `decode` applied to each batch in a background thread, up to `depth`
    batches ahead and (on CUDA) on a stream of its own, so decoding overlaps the training step:
    torchvision's GPU decode holds the calling thread until the batch is decoded. The order of
    the batches is kept; an error in the thread is raised here."""

    _END = object()

    def __init__(self, loader, decode, device: torch.device, depth: int):
        self.loader, self.decode, self.device, self.depth = loader, decode, device, depth

    def __iter__(self) -> Iterator[dict]:
        import queue
        import threading
        from contextlib import nullcontext

        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None
        # the DataLoader's iterator (which starts its worker processes) in this thread: forking
        # from another thread would hand the children this thread's objects to tear down
        source = iter(self.loader)
        ready: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()

        def hand_over(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                with torch.cuda.device(self.device) if cuda else nullcontext(), \
                        torch.cuda.stream(stream) if cuda else nullcontext():
                    for batch in source:
                        decoded = self.decode(batch)
                        done = torch.cuda.Event() if cuda else None
                        if done is not None:
                            done.record(stream)
                        if not hand_over((decoded, done)):
                            return
            except BaseException as e:  # raised in the training thread, where the user sees it
                hand_over((e, None))
                return
            hand_over((self._END, None))

        thread = threading.Thread(target=work, name="vitpipe-decode-ahead", daemon=True)
        thread.start()
        try:
            while True:
                item, done = ready.get()
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                if done is not None:  # the step's stream waits for the decode, and owns its outputs now
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(done)
                    for t in (item["images"], item["targets"]):
                        t.record_stream(current)
                yield item
        finally:
            stop.set()
            # Before the next epoch's iterator: a persistent-worker DataLoader reuses its iterator,
            # which this thread may still be reading (it stops within one batch).
            thread.join(timeout=300)
            if thread.is_alive():
                log.warning("the decode-ahead thread did not stop within 300 s; continuing without it")


class DeviceTrainLoader(TrainLoader):
    """`TrainLoader` whose batches are decoded and augmented on `device`; the same iteration,
    epochs, `state_dict` and `stats` (plus `decoded_on_cpu`). Images come as `dtype` (float32 by
    default) on `device`. `decode_ahead` batches are decoded in a background thread while the
    step runs (0: in the training thread, when asked for)."""

    _stream_class = _EncodedTrainStream

    def __init__(self, cfg, index: dict, *, rank: int, world_size: int, seed: int, return_keys: bool,
                 device: torch.device, dtype: torch.dtype | None = None, decode_ahead: int = 2):
        self.device, self.dtype = torch.device(device), dtype or torch.float32  # before describe() logs
        super().__init__(cfg, index, rank=rank, world_size=world_size, seed=seed, return_keys=return_keys)
        self._decoder = _DeviceDecoder(self.device, cfg.channels)
        self._scale, self._shift = _normalizer(*cfg.channel_stats(), self.device)
        aug = cfg.augment
        self._rand_augment = None
        if aug.rand_augment:
            from torchvision.transforms import v2

            self._rand_augment = v2.RandAugment(num_ops=aug.rand_augment_n, magnitude=aug.rand_augment_m)
        self._decode_ahead = decode_ahead

    def describe(self) -> str:
        return f"{super().describe()}; decoded on {self.device} (data.decode=gpu)"

    def _batches(self):
        # Wrapped per epoch, not kept: a _DecodeAhead held by the loader would hold the loader
        # (through self._decode) in a reference cycle, freed only by the garbage collector, which
        # leaves torch's worker shutdown to time out (see pipeline.loader._stop_workers).
        if not self._decode_ahead:
            return self._loader
        return _DecodeAhead(self._loader, self._decode, self.device, self._decode_ahead)

    @property
    def stats(self) -> dict:
        return {**super().stats, "decoded_on_cpu": self._decoder.on_cpu}

    def _decode(self, batch: dict) -> dict:
        """The worker's encoded batch -> cropped, flipped and (without RandAugment) normalised images
        on the device (see the module docstring). Uses no global RNG: it may run in another thread."""
        cfg, aug, n = self.cfg, self.cfg.augment, len(batch["ok"])
        events = list(batch["events"])
        images = self._decoder(batch, events)
        labels, keys = list(batch["labels"]), list(batch["keys"])
        generator = torch.Generator().manual_seed(batch["seed"])
        trials, flip_u, refill_u = draw_crop_uniforms(n, generator)
        good = [i for i in range(n) if images[i] is not None]
        filled = n - len(good)
        if not good:  # the whole batch is bad: any decodable sample of the split stands in
            from torchvision.transforms.v2.functional import pil_to_tensor

            img, label, key = self._stream._rescue(events)[0]
            images[0], labels[0], keys[0] = pil_to_tensor(img).to(self.device), label, key
            good = [0]
        for i in range(n):
            if images[i] is None:
                j = good[min(int(refill_u[i] * len(good)), len(good) - 1)]
                images[i], labels[i], keys[i] = images[j], labels[j], keys[j]
        sizes = torch.tensor([img.shape[1:] for img in images])
        boxes = random_resized_crop_boxes(sizes, trials, aug.crop_scale, aug.crop_ratio)
        size = cfg.image_size
        out = torch.empty((n, cfg.channels, size, size), dtype=torch.float32, device=self.device)
        crop_resize(images, boxes, size, out=out)
        flip = (flip_u < aug.hflip).to(self.device)
        out = torch.where(flip.view(-1, 1, 1, 1), out.flip(-1), out)
        if self._rand_augment is None:
            out = out.mul_(self._scale).sub_(self._shift)
        return {"images": out, "targets": torch.tensor(labels, dtype=torch.long).to(self.device, non_blocking=True),
                "keys": keys, "events": events, "filled": filled, "seed": batch["seed"]}

    def _prepare(self, batch: dict) -> dict:
        """What needs torch's global RNG, in the training thread: RandAugment, Mixup/CutMix."""
        if "images" not in batch:  # decode_ahead=0
            batch = self._decode(batch)
        out, targets = batch["images"], batch["targets"]
        with torch.random.fork_rng(devices=[]):  # the CPU loader's per-batch seed
            torch.manual_seed(batch["seed"])
            if self._rand_augment is not None:
                crops = out.round_().clamp_(0, 255).to(torch.uint8)
                out = torch.stack([self._rand_augment(c) for c in crops]).float().mul_(self._scale).sub_(self._shift)
            out, targets = self._stream.mixer(out, targets)
        prepared = {"images": out.to(self.dtype), "targets": targets, "events": batch["events"],
                    "filled": batch["filled"]}
        if self._stream.return_keys:
            prepared["keys"] = batch["keys"]
        return prepared


class DeviceEvalLoader(EvalLoader):
    """`EvalLoader` whose batches are decoded, resized and center-cropped on `device`."""

    _stream_class = _EncodedEvalStream

    def __init__(self, cfg, index: dict, split: str, *, rank: int, world_size: int, device: torch.device,
                 dtype: torch.dtype | None = None):
        super().__init__(cfg, index, split, rank=rank, world_size=world_size)
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype or torch.float32
        self._decoder = _DeviceDecoder(self.device, cfg.channels)
        self._scale, self._shift = _normalizer(*cfg.channel_stats(), self.device)

    @property
    def stats(self) -> dict:
        return {**super().stats, "decoded_on_cpu": self._decoder.on_cpu}

    def _prepare(self, batch: dict) -> dict:
        events = list(batch["events"])
        decoded = self._decoder(batch, events)
        keep = [i for i, img in enumerate(decoded) if img is not None]  # eval skips bad samples
        images = [decoded[i] for i in keep]
        size = self.cfg.image_size
        out = torch.empty((len(images), self.cfg.channels, size, size), dtype=torch.float32, device=self.device)
        if images:
            sizes = torch.tensor([img.shape[1:] for img in images])
            crop_resize(images, center_crop_boxes(sizes, size, self.cfg.eval_crop_pct), size, out=out)
        out = out.mul_(self._scale).sub_(self._shift)
        return {"images": out.to(self.dtype), "events": events,
                "targets": torch.tensor([batch["labels"][i] for i in keep], dtype=torch.long).to(self.device),
                "keys": [batch["keys"][i] for i in keep]}
