"""Image processor for CoDe: robust image loading, the training augmentation and the evaluation resize.

Everything is done with PIL, NumPy and torch (no torchvision):

- ``load_image`` turns PIL images of any mode, NumPy arrays, file paths, URLs and encoded bytes into an RGB
  PIL image. Files, downloads and bytes are turned upright by their EXIF orientation, transparent pixels are
  composited onto white (how such images are displayed), 16-bit data is scaled to 8 bits, and anything
  unusable raises ``InvalidImageError``.
- training (docs/method.md#training-data): RandomResizedCrop with torchvision's sampling rule, PIL bilinear resize,
  horizontal flip, normalisation with ImageNet statistics.
- evaluation (docs/method.md#whole-images): keep-ratio resize to the short side and long-side cap of an
  ``InferenceProtocol`` (the model's, which its config stores), bilinear without antialiasing and rounded to
  8-bit levels as OpenCV does in the original evaluation pipeline, then the same normalisation.
- ``post_process_semantic_segmentation`` turns class score maps into label maps.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import urllib.request
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs

from .configuration_code import InferenceProtocol
from .inference import insert_background

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_PIXELS = 4096 * 4096
URL_SCHEMES = ("http://", "https://")
URL_TIMEOUT_SECONDS = 30
# Keys of 0.1 that held the evaluation resize; the model config's protocol owns it now.
LEGACY_RESIZE_KEYS = ("eval_short_side", "eval_max_long_side")
# Transparent pixels are composited onto this colour, as image viewers and browsers show them.
TRANSPARENCY_BACKGROUND = (255, 255, 255)
# PIL opens 16-bit PNG/TIFF data as one of these modes; "I" (32-bit int) is read as 16-bit data too.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
EXIF_ORIENTATION_TAG = 0x0112
# torchvision's RandomResizedCrop tries this many random boxes before falling back to a centre crop.
CROP_ATTEMPTS = 10
TORCH_INTERPOLATION = {
    Image.Resampling.NEAREST: "nearest",
    Image.Resampling.BILINEAR: "bilinear",
    Image.Resampling.BICUBIC: "bicubic",
}

ImageLike = Image.Image | np.ndarray | str | Path | bytes | bytearray | Mapping


class InvalidImageError(ValueError):
    """An input cannot be turned into an RGB image (empty, corrupt, missing, wrong shape or type)."""


def _check_not_empty(width: int, height: int, description: str) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"The {description} is empty (width {width}, height {height}).")


def _to_uint8_levels(array: np.ndarray) -> np.ndarray:
    """uint8 as is, uint16 scaled by 255/65535, floats in [0, 1] scaled by 255 (rounded)."""
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if array.dtype == np.uint16:
        return np.rint(array / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidImageError("The float image array contains NaN or infinite values.")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise InvalidImageError(
                f"Float image arrays must hold values in [0, 1]; got values in [{low:g}, {high:g}]. "
                "Divide 0-255 data by 255 or pass a uint8 array."
            )
        return np.rint(array * 255.0).astype(np.uint8)
    raise InvalidImageError(
        f"Unsupported image array dtype {array.dtype}; use uint8, uint16 or floating point values in [0, 1]."
    )


def _array_to_rgb(array: np.ndarray) -> Image.Image:
    """HxW, HxWx1, HxWx3 or HxWx4 (channels last) array -> RGB PIL image."""
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise InvalidImageError(
            "Image arrays must have shape HxW, HxWx1, HxWx3 or HxWx4 (channels last); "
            f"got shape {tuple(array.shape)}."
        )
    _check_not_empty(array.shape[1], array.shape[0], f"image array of shape {tuple(array.shape)}")
    return _to_rgb(Image.fromarray(_to_uint8_levels(array)))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, compositing transparency onto ``TRANSPARENCY_BACKGROUND``."""
    _check_not_empty(image.width, image.height, f"{image.mode} image")
    if image.mode == "RGB" and "transparency" not in image.info:
        return image
    if "A" in image.mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*TRANSPARENCY_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in SIXTEEN_BIT_MODES:
        # PIL's own convert() clips 16-bit values at 255 instead of scaling them.
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
        return Image.fromarray(_to_uint8_levels(values)).convert("RGB")
    if image.mode == "F":
        return _array_to_rgb(np.asarray(image))
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as err:
        raise InvalidImageError(f"Cannot convert a {image.mode} image to RGB: {err}") from err


def _upright(image: Image.Image) -> Image.Image:
    """The decoded image as viewers show it: its EXIF orientation (how phones store photos) applied."""
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):  # unreadable EXIF: keep the stored pixels
        return image
    return ImageOps.exif_transpose(image) if orientation in range(2, 9) else image


@contextlib.contextmanager
def _refusing_bombs(description: str) -> Iterator[None]:
    """Refuse images above PIL's pixel limit (``Image.MAX_IMAGE_PIXELS``), which PIL would only warn about."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as error:
        raise InvalidImageError(
            f"Cannot decode {description}: it has more pixels than the limit of {Image.MAX_IMAGE_PIXELS:,} that "
            f"images are decoded up to (a guard against decompression bombs): {error}"
        ) from error


def _decode(source: io.BytesIO | Path, description: str, max_pixels: int | None) -> Image.Image:
    """Open, fully decode and convert an encoded image; decoding errors become ``InvalidImageError``."""
    try:
        with _refusing_bombs(description), Image.open(source) as opened:
            if max_pixels is not None and opened.width * opened.height > max_pixels:
                # JPEG can decode at 1/2, 1/4 or 1/8 scale directly: far less memory for huge photos.
                opened.draft("RGB", _capped_size(opened.width, opened.height, max_pixels))
            opened.load()
            return _to_rgb(_upright(opened))
    except InvalidImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as err:
        raise InvalidImageError(f"Cannot decode {description}: {err}") from err


def _open_path(path: Path, max_pixels: int | None) -> Image.Image:
    if not path.exists():
        raise InvalidImageError(f"Image file not found: {str(path)!r}.")
    if not path.is_file():
        raise InvalidImageError(f"Image path is not a file: {str(path)!r}.")
    return _decode(path, f"image file {str(path)!r}", max_pixels)


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_SECONDS) as response:
            return response.read()
    except (OSError, ValueError) as error:  # urllib's URLError and HTTPError are OSErrors
        raise InvalidImageError(f"Could not download the image at {url}: {error}") from error


def _capped_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """(width, height) scaled down, keeping the aspect ratio, to at most ``max_pixels`` pixels."""
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def load_image(image: ImageLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Turn any supported image input into an RGB PIL image.

    Args:
        image: a PIL image of any mode; a NumPy array of shape HxW, HxWx1, HxWx3 or HxWx4 (uint8,
            uint16, or float in [0, 1]); a file path (``str`` or ``Path``); an ``http(s)://`` URL; encoded bytes;
            or a mapping with ``"bytes"`` or ``"path"`` (what ``datasets.Image(decode=False)`` yields).
        max_pixels: images with more pixels are downscaled (aspect kept, bilinear) with a warning;
            ``None`` disables the cap. Encoded images above PIL's limit (``Image.MAX_IMAGE_PIXELS``, about
            89 million pixels) are refused whatever the cap.

    Conversions: transparency (RGBA, LA, PA, palette or RGB with a transparent colour) is composited
    onto white; 16-bit data (I;16*, and I, which is how PIL opens 16-bit PNGs) is scaled by 255/65535;
    mode F follows the float array rule ([0, 1]); CMYK, palette, 1-bit and the rest use PIL's
    ``convert("RGB")``. Files, URLs and bytes are turned by their EXIF orientation (phone photos), as viewers
    and browsers show them; PIL images and arrays are taken as they are (their owner decoded them, e.g. a benchmark
    loader that keeps the stored orientation its label maps share).

    Raises:
        InvalidImageError: empty image, unreadable or corrupt data, missing path, failed download, wrong array
            shape or dtype, out-of-range float values, or an unsupported input type.
    """
    if isinstance(image, Image.Image):
        rgb = _to_rgb(image)
    elif isinstance(image, np.ndarray):
        rgb = _array_to_rgb(image)
    elif isinstance(image, str) and image.startswith(URL_SCHEMES):
        rgb = _decode(io.BytesIO(_download(image)), f"image at {image}", max_pixels)
    elif isinstance(image, (str, Path)):
        rgb = _open_path(Path(image), max_pixels)
    elif isinstance(image, (bytes, bytearray)):
        if not image:
            raise InvalidImageError("The image bytes are empty.")
        rgb = _decode(io.BytesIO(image), f"image bytes ({len(image)} bytes)", max_pixels)
    elif isinstance(image, Mapping) and (image.get("bytes") or image.get("path")):
        return load_image(image.get("bytes") or image["path"], max_pixels)
    else:
        raise InvalidImageError(
            f"Unsupported image input of type {type(image).__name__}; expected a PIL image, a NumPy array, "
            "a file path, encoded bytes or a mapping with 'bytes' or 'path'."
        )
    if max_pixels is not None and rgb.width * rgb.height > max_pixels:
        new_size = _capped_size(rgb.width, rgb.height, max_pixels)
        logger.warning(
            f"Image of {rgb.width}x{rgb.height} pixels exceeds max_pixels={max_pixels}; "
            f"downscaling it to {new_size[0]}x{new_size[1]}."
        )
        rgb = rgb.resize(new_size, resample=Image.Resampling.BILINEAR)
    return rgb


def keep_ratio_size(height: int, width: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """Size after a keep-ratio resize to short side ``short_side`` with the long side at most ``max_long_side``.

    The scale is ``min(short_side / short, max_long_side / long)`` and each side is rounded half up,
    as mmcv's ``imrescale`` does in the original evaluation pipeline.

    Returns:
        ``(new_height, new_width)``, each at least 1.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"Image size must be positive; got height {height}, width {width}.")
    scale = min(short_side / min(height, width), max_long_side / max(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def random_resized_crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: np.random.Generator,
) -> tuple[int, int, int, int]:
    """Sample a crop box with torchvision's ``RandomResizedCrop`` rule.

    Up to ``CROP_ATTEMPTS`` times: area fraction uniform in ``scale``, aspect ratio (width / height)
    log-uniform in ``ratio``; the first box that fits is placed uniformly at random. Otherwise the
    largest centred box whose aspect ratio is clamped into ``ratio``.

    Returns:
        ``(top, left, crop_height, crop_width)`` in pixels.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(CROP_ATTEMPTS):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = round(math.sqrt(target_area * aspect_ratio))
        crop_height = round(math.sqrt(target_area / aspect_ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width
    image_ratio = width / height
    if image_ratio < min(ratio):
        crop_width, crop_height = width, round(width / min(ratio))
    elif image_ratio > max(ratio):
        crop_width, crop_height = round(height * max(ratio)), height
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


class CoDeImageProcessorKwargs(ImagesKwargs, total=False):
    """Options of ``CoDeImageProcessor`` that ``from_pretrained(..., **kwargs)`` may override."""

    train_crop_size: int
    train_crop_scale: tuple[float, float]
    train_crop_ratio: tuple[float, float]
    flip_probability: float
    max_pixels: int | None


class CoDeImageProcessor(BaseImageProcessor):
    r"""Image processor of CoDe (training augmentation, evaluation resize, segmentation post-processing).

    Args:
        image_mean, image_std: per-channel normalisation statistics (ImageNet's by default, as the
            original uses everywhere; its trained parameters live in that space).
        train_crop_size: side S of the square training crop.
        train_crop_scale: range of the crop's area as a fraction of the image.
        train_crop_ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
        flip_probability: probability of a horizontal flip in training.
        max_pixels: inputs above this many pixels are downscaled with a warning (``None``: no cap).
        resample: PIL filter of the training crop resize; the evaluation resize uses the same kind of
            interpolation in torch without antialiasing (nearest, bilinear or bicubic).
    """

    model_input_names: ClassVar[list[str]] = ["pixel_values"]
    valid_kwargs = CoDeImageProcessorKwargs

    def __init__(
        self,
        image_mean: Sequence[float] = IMAGENET_MEAN,
        image_std: Sequence[float] = IMAGENET_STD,
        train_crop_size: int = 224,
        train_crop_scale: Sequence[float] = (0.9, 1.0),
        train_crop_ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_probability: float = 0.5,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        resample: int = Image.Resampling.BILINEAR,
        **kwargs: Any,
    ) -> None:
        # 0.1 stored the evaluation resize here. It is only the default of a processor used on its own: a
        # CoDeProcessor always passes the model's protocol (and compares the two when loading).
        self.legacy_resize = {key: int(kwargs.pop(key)) for key in LEGACY_RESIZE_KEYS if key in kwargs}
        if self.legacy_resize:
            warnings.warn(
                f"CoDeImageProcessor({', '.join(self.legacy_resize)}) is deprecated and goes in 0.3: the evaluation "
                "resize is part of the model's InferenceProtocol (short_side, max_long_side), passed to preprocess",
                FutureWarning,
                stacklevel=2,
            )
        super().__init__(**kwargs)
        self.image_mean = self._channel_values("image_mean", image_mean)
        self.image_std = self._channel_values("image_std", image_std)
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive; got {self.image_std}.")
        self.train_crop_size = int(train_crop_size)
        self.train_crop_scale = self._range("train_crop_scale", train_crop_scale)
        self.train_crop_ratio = self._range("train_crop_ratio", train_crop_ratio)
        if not 0 < self.train_crop_scale[0] <= 1 or self.train_crop_ratio[0] <= 0:
            raise ValueError(
                f"train_crop_scale must lie in (0, 1] and train_crop_ratio be positive; "
                f"got {self.train_crop_scale} and {self.train_crop_ratio}."
            )
        self.flip_probability = float(flip_probability)
        if not 0.0 <= self.flip_probability <= 1.0:
            raise ValueError(f"flip_probability must be in [0, 1]; got {self.flip_probability}.")
        self.max_pixels = None if max_pixels is None else int(max_pixels)
        for name in ("train_crop_size", "max_pixels"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive; got {value}.")
        if int(resample) not in TORCH_INTERPOLATION:
            raise ValueError(
                f"resample must be one of PIL's NEAREST, BILINEAR or BICUBIC filters; got {resample!r}."
            )
        self.resample = int(resample)

    @staticmethod
    def _channel_values(name: str, values: Sequence[float]) -> tuple[float, float, float]:
        values = tuple(float(v) for v in values)
        if len(values) != 3:
            raise ValueError(f"{name} needs one value per RGB channel (3 values); got {values}.")
        return values

    @staticmethod
    def _range(name: str, values: Sequence[float]) -> tuple[float, float]:
        low, high = (float(v) for v in values)
        if low > high:
            raise ValueError(f"{name} must be (low, high) with low <= high; got {(low, high)}.")
        return low, high

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # The base class drops None values, but max_pixels=None (no cap) must survive a save/load.
        output["max_pixels"] = self.max_pixels
        output.pop("legacy_resize", None)
        return output

    def load_image(self, image: ImageLike) -> Image.Image:
        """``load_image`` with this processor's ``max_pixels`` cap."""
        return load_image(image, max_pixels=self.max_pixels)

    def eval_size(self, height: int, width: int, protocol: InferenceProtocol | None = None) -> tuple[int, int]:
        """``(new_height, new_width)`` of the evaluation resize of a ``height`` x ``width`` image under
        ``protocol`` (default: the paper's, or the deprecated resize this processor was built with)."""
        if protocol is None:
            legacy = self.legacy_resize
            protocol = InferenceProtocol().replace(
                short_side=legacy.get("eval_short_side"), max_long_side=legacy.get("eval_max_long_side")
            )
        return keep_ratio_size(height, width, protocol.short_side, protocol.max_long_side)

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """[3, H, W] floats in [0, 1] -> normalised with ``image_mean`` / ``image_std``."""
        mean = torch.tensor(self.image_mean, dtype=pixels.dtype).view(3, 1, 1)
        std = torch.tensor(self.image_std, dtype=pixels.dtype).view(3, 1, 1)
        return (pixels - mean) / std

    @staticmethod
    def _levels(image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> float32 tensor [3, H, W] of 8-bit levels (0..255)."""
        return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)

    def preprocess_train(self, image: ImageLike, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Training transform: random resized crop to S x S, random horizontal flip, normalisation.

        Args:
            image: anything ``load_image`` accepts.
            rng: source of randomness (crop box first, then the flip); a fresh unseeded one if ``None``.

        Returns:
            float32 tensor [3, S, S] with S = ``train_crop_size``.
        """
        rgb = self.load_image(image)
        rng = np.random.default_rng() if rng is None else rng
        top, left, crop_height, crop_width = random_resized_crop_box(
            rgb.height, rgb.width, self.train_crop_scale, self.train_crop_ratio, rng
        )
        size = (self.train_crop_size, self.train_crop_size)
        crop = rgb.resize(size, resample=self.resample, box=(left, top, left + crop_width, top + crop_height))
        pixels = self._normalise(self._levels(crop) / 255.0)
        if rng.random() < self.flip_probability:
            pixels = pixels.flip(-1)
        return pixels

    def _eval_pixels(self, rgb: Image.Image, protocol: InferenceProtocol | None) -> torch.Tensor:
        height, width = self.eval_size(rgb.height, rgb.width, protocol)
        levels = self._levels(rgb)
        if (height, width) != (rgb.height, rgb.width):
            mode = TORCH_INTERPOLATION[self.resample]
            levels = F.interpolate(
                levels[None],
                size=(height, width),
                mode=mode,
                align_corners=None if mode == "nearest" else False,
                antialias=False,
            )[0]
            # The original resizes uint8 images with OpenCV, whose output is rounded to 8-bit levels.
            levels = levels.round().clamp(0, 255)
        return self._normalise(levels / 255.0)

    def preprocess_eval(self, image: ImageLike, protocol: InferenceProtocol | None = None) -> torch.Tensor:
        """Evaluation transform: keep-ratio resize (see ``eval_size``) and normalisation.

        Returns:
            float32 tensor [3, H, W] with ``(H, W) = eval_size(height, width, protocol)`` of the loaded image.
        """
        return self._eval_pixels(self.load_image(image), protocol)

    def preprocess(
        self,
        images: ImageLike | Sequence[ImageLike],
        return_tensors: str | None = "pt",
        protocol: InferenceProtocol | None = None,
    ) -> BatchFeature:
        """Evaluation inputs for one image or a list of images, resized as ``protocol`` says (default: the
        paper's protocol; ``CoDeProcessor`` passes the model's).

        Paths and encoded bytes are decoded here, with their EXIF orientation applied; an in-memory PIL image
        or array is taken as given (as transformers' image processors do).

        Returns:
            ``BatchFeature`` with ``pixel_values`` (a tensor [B, 3, H, W] when all images get the
            same size, else a list of B tensors [3, H_i, W_i]) and ``original_sizes``, the
            ``(height, width)`` of each loaded image (after any ``max_pixels`` downscale).
        """
        if return_tensors not in ("pt", None):
            raise ValueError(f"CoDeImageProcessor returns torch tensors only; got return_tensors={return_tensors!r}.")
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("No images were given.")
        loaded = [self.load_image(image) for image in batch]
        pixel_values: torch.Tensor | list[torch.Tensor] = [self._eval_pixels(rgb, protocol) for rgb in loaded]
        if len({tuple(pixels.shape) for pixels in pixel_values}) == 1:
            pixel_values = torch.stack(pixel_values)
        original_sizes = [(rgb.height, rgb.width) for rgb in loaded]
        return BatchFeature({"pixel_values": pixel_values, "original_sizes": original_sizes})

    def post_process_semantic_segmentation(
        self,
        outputs: Any,
        target_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None,
        background_threshold: float | None = None,
        return_scores: bool = False,
    ) -> list[torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Class score maps -> label maps (class ids are positions in the vocabulary, ``background`` included).

        Args:
            outputs: a ``CoDeSegmentationOutput`` (or any object with ``scores``, or ``logits``): a tensor
                [B, N, h, w] of class scores or a list of B tensors [N, h_i, w_i].
            target_sizes: ``(height, width)`` per image to resize the score maps to (bilinear,
                ``align_corners=False``, no antialiasing) before the argmax. ``None``: the sizes of the images
                as the processor saw them (``outputs.original_sizes``), or the maps' own sizes without those.
            background_threshold: deprecated (goes in 0.3): prepends a constant background map as class 0; put
                ``background`` in the class list instead.
            return_scores: also return each pixel's score for its class.

        Returns:
            list of B ``torch.LongTensor`` [H_i, W_i] of class ids; with ``return_scores``, list of B dicts:
            ``segmentation`` (those class ids) and ``scores`` (``torch.FloatTensor`` [H_i, W_i], the winning
            class's score at each pixel, after the same resize).
        """
        scores = getattr(outputs, "scores", None)
        if scores is None:
            scores = outputs.logits
        score_maps = list(scores.unbind(0)) if isinstance(scores, torch.Tensor) else list(scores)
        for maps in score_maps:
            if maps.dim() != 3:
                raise ValueError(f"Each score map must be [num_classes, height, width]; got {tuple(maps.shape)}.")
        if target_sizes is None:
            target_sizes = getattr(outputs, "original_sizes", None)
        if target_sizes is not None and len(target_sizes) != len(score_maps):
            raise ValueError(
                f"Got {len(target_sizes)} target sizes for a batch of {len(score_maps)} score maps."
            )
        if background_threshold is not None:
            warnings.warn(
                "post_process_semantic_segmentation(background_threshold=...) is deprecated and goes in 0.3: put "
                "'background' in the class list (processor text=[...]); the model inserts its map",
                FutureWarning,
                stacklevel=2,
            )
        segmentations = []
        for index, maps in enumerate(score_maps):
            maps = maps.float()
            if background_threshold is not None:
                maps = insert_background(maps, 0, float(background_threshold))
            if target_sizes is not None:
                size = tuple(int(side) for side in target_sizes[index])
                if size != tuple(maps.shape[1:]):
                    maps = F.interpolate(
                        maps[None], size=size, mode="bilinear", align_corners=False, antialias=False
                    )[0]
            # the indices of torch.max (the first maximum, as argmax's): its reduction over the class dimension
            # is faster on the CPU than torch.argmax's
            best = maps.max(dim=0)
            segmentations.append({"segmentation": best.indices, "scores": best.values} if return_scores else best.indices)
        return segmentations
