"""Images in chat messages: where each family's image parts end up (OpenAI `image_url` parts, the one form
the chat layer reads), and their decoding into RGB pixels with the limits every request is held to.

Decoding is Pillow's (PNG, JPEG, WebP, GIF: its first frame); whatever it cannot read, or reads as something
else, is the client's error (a 400 in the family's shape), never the server's.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import time
import warnings
from collections.abc import Mapping
from typing import Any

import httpx
from PIL import Image as PILImage

from ..engine.vision import Image
from ..errors import APIError

MAX_IMAGES = 8  # per request
MAX_IMAGE_BYTES = 20 << 20  # encoded, per image (OpenAI's own limit is 20 MB)
MAX_IMAGE_PIXELS = 40_000_000  # decoded, per image: a few KB of PNG can claim gigapixels
FETCH_TIMEOUT = 10.0  # seconds for the whole of one remote image (--allow-image-urls)
MAX_REDIRECTS = 3
FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}

_DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,",
                       re.ASCII)


def image_url_part(url: str) -> dict[str, Any]:
    """The chat layer's form of one image, whichever family sent it."""
    return {"type": "image_url", "image_url": {"url": url}}


def part_url(part: Mapping[str, Any]) -> Any:
    """The URL of an OpenAI `image_url` part (`{"url": …}` or, as some clients send it, the bare string)."""
    value = part.get("image_url")
    return value.get("url") if isinstance(value, Mapping) else value


def _bad_image(message: str, param: str, code: str = "invalid_image") -> APIError:
    return APIError(400, message, param=param, code=code)


def _data_url_bytes(url: str, param: str) -> bytes:
    match = _DATA_URL.match(url)
    if match is None or not match.group("b64"):
        raise _bad_image("Image URLs must be base64 data URLs (data:image/png;base64,…).", param,
                         "invalid_image_url")
    payload = url[match.end():]
    if len(payload) * 3 // 4 > MAX_IMAGE_BYTES:
        raise _bad_image(f"Image is larger than {MAX_IMAGE_BYTES >> 20} MB.", param, "image_too_large")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_image("Image data is not valid base64.", param) from None


def _fetch(url: str, param: str) -> bytes:
    """A remote image's bytes, within MAX_IMAGE_BYTES and FETCH_TIMEOUT (both a 400 when exceeded)."""
    deadline = time.monotonic() + FETCH_TIMEOUT
    try:
        with httpx.Client(follow_redirects=True, max_redirects=MAX_REDIRECTS, timeout=FETCH_TIMEOUT) as client, \
                client.stream("GET", url) as response:
            if response.status_code != 200:
                raise _bad_image(f"Fetching the image gave HTTP {response.status_code}.", param, "image_fetch_failed")
            data = bytearray()
            for piece in response.iter_bytes():
                data += piece
                if len(data) > MAX_IMAGE_BYTES:
                    raise _bad_image(f"Image is larger than {MAX_IMAGE_BYTES >> 20} MB.", param, "image_too_large")
                if time.monotonic() > deadline:
                    raise _bad_image(f"Fetching the image took longer than {FETCH_TIMEOUT:g} s.", param,
                                     "image_fetch_failed")
            return bytes(data)
    except httpx.HTTPError as exc:
        raise _bad_image(f"The image could not be fetched: {type(exc).__name__}.", param,
                         "image_fetch_failed") from None


def decode_image(url: Any, *, param: str = "messages", fetch: bool = False) -> Image:
    """One image URL → RGB pixels. Raises APIError (400) for anything not a supported, sane image. http(s)
    URLs are fetched only with `fetch` (the server's --allow-image-urls)."""
    if not isinstance(url, str) or not url:
        raise _bad_image("An image part needs a URL (a base64 data URL).", param, "invalid_image_url")
    if url.startswith(("http://", "https://")):
        if not fetch:
            raise _bad_image("This server does not fetch remote images (start it with --allow-image-urls); send "
                             "the image as a base64 data URL.", param, "image_url_not_allowed")
        data = _fetch(url, param)
    else:
        data = _data_url_bytes(url, param)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            with PILImage.open(io.BytesIO(data)) as image:
                if image.format not in FORMATS:
                    raise _bad_image(f"Unsupported image type {image.format or 'unknown'}: send PNG, JPEG, WebP "
                                     "or GIF.", param, "unsupported_image_type")
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise _bad_image(f"Image of {image.width}x{image.height} pixels is over the limit of "
                                     f"{MAX_IMAGE_PIXELS} pixels.", param, "image_too_large")
                image.seek(0)  # a GIF's (or animated WebP's) first frame
                rgb = image.convert("RGB")
                return Image(rgb.width, rgb.height, rgb.tobytes())
    except APIError:
        raise
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning):
        raise _bad_image("Image has too many pixels.", param, "image_too_large") from None
    except Exception:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, … for broken files
        raise _bad_image("Image could not be decoded (corrupt, truncated, or not an image).", param) from None


def decode_images(urls: list[Any], *, param: str = "messages", fetch: bool = False) -> list[Image]:
    if len(urls) > MAX_IMAGES:
        raise _bad_image(f"Too many images: {len(urls)} (at most {MAX_IMAGES} per request).", param,
                         "too_many_images")
    return [decode_image(url, param=param, fetch=fetch) for url in urls]
