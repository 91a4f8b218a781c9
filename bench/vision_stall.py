"""How long an image holds up the other streams: lmkube evaluates an image (libmtmd encode, then the decode of
its embeddings into the request's sequence) between two engine steps, so every concurrent stream waits for it.

    .venv/bin/python bench/vision_stall.py [--images 10] [--streams 2]

Per projector shape (generated random projectors, libmtmd's `mlp` type, next to the random SmolLM2-135M-shaped
bench model): `--streams` text streams generate while `--images` requests with one fresh image each arrive one
after another. Reported per image: its encode (vision encoder and projector, on a worker thread: the streams
go on meanwhile, sharing the CPU with it) and the engine-thread time on its rows (decoded 32 a step: all other
streams wait for this, spread over several steps); and the text streams' inter-token gaps while images went in
(p50 and max) against their gaps without images.
"""

from __future__ import annotations

import argparse
import base64
import io
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image
from servers import THREADS, Server, ensure_model, free_port, running, wait_ready

from lmkube.synthetic_gguf import SMOLLM_135M
from lmkube.synthetic_mmproj import VisionShape, write_mmproj

SHAPES = {
    "32px/8 (16 tokens)": VisionShape(),
    "64px/8 (64 tokens)": VisionShape(image_size=64, patch_size=8, n_embd=64, n_ff=128, n_head=4,
                                      projector_hidden=128),
    "224px/14 (256 tokens, width 256, 4 layers)": VisionShape(image_size=224, patch_size=14, n_embd=256, n_ff=1024,
                                                               n_layer=4, n_head=4, projector_hidden=576),
}


def _png(seed: int) -> str:
    buffer = io.BytesIO()
    Image.effect_noise((256, 192), 40 + seed).convert("RGB").rotate(seed).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _text_stream(url: str, gaps: list[tuple[float, float]], stop: threading.Event) -> None:
    """Streams until `stop`, recording (time, gap since the previous token)."""
    while not stop.is_set():
        body = {"model": "bench/vision", "max_tokens": 300, "stream": True, "logit_bias": {"2": -100},
                "messages": [{"role": "user", "content": "Tell me a long story."}]}
        last = None
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                if last is not None:
                    gaps.append((now, now - last))
                last = now
                if stop.is_set():
                    break


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))


def measure(shape: VisionShape, images: int, streams: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "bench" / "vision"
        folder.mkdir(parents=True)
        (folder / "vision-F16.gguf").symlink_to(ensure_model())
        write_mmproj(folder / "mmproj-vision-F32.gguf", text_n_embd=SMOLLM_135M.n_embd, shape=shape)
        port = free_port()
        command = [str(Path(__import__("sys").executable).with_name("lmkube")), "serve", "--models-dir", tmp,
                   "--port", str(port), "--parallel", str(streams + 1), "--threads", str(THREADS),
                   "--log-level", "warning"]
        with running(Server("lmkube", command, port, Path(tmp) / "server.log")) as server:
            wait_ready(server)
            url = server.url
            httpx.post(f"{url}/api/v1/models/load", json={"model": "bench/vision"}, timeout=300)
            gaps: list[tuple[float, float]] = []
            stop = threading.Event()
            readers = [threading.Thread(target=_text_stream, args=(url, gaps, stop)) for _ in range(streams)]
            for reader in readers:
                reader.start()
            time.sleep(3)  # the streams' plain rhythm
            windows = []
            for i in range(images):
                started = time.perf_counter()
                httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
                    "model": "bench/vision", "max_tokens": 1, "messages": [{"role": "user", "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": _png(i)}}]}]})
                windows.append((started, time.perf_counter()))
                time.sleep(0.3)
            stop.set()
            for reader in readers:
                reader.join()
            encoded = _metric(url, "lmkube_images_evaluated_total")
            seconds = _metric(url, "lmkube_image_seconds_total")
            encode_seconds = _metric(url, "lmkube_image_encode_seconds_total")
    during = [gap for at, gap in gaps if any(a <= at <= b + 0.05 for a, b in windows)]
    quiet = [gap for at, gap in gaps if at < windows[0][0]]
    return {"image_ms": 1e3 * seconds / max(encoded, 1),
            "encode_ms": 1e3 * encode_seconds / max(encoded, 1), "quiet_p50_ms": 1e3 * statistics.median(quiet),
            "during_p50_ms": 1e3 * statistics.median(during), "during_max_ms": 1e3 * max(during),
            "quiet_max_ms": 1e3 * max(quiet)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--streams", type=int, default=2)
    args = parser.parse_args()
    print(f"| projector | encode per image (worker) | engine time per image (stall, in slices) | text ITL p50 quiet / "
          f"during images | max gap quiet / during | ({args.streams} text streams, {THREADS} threads)")
    print("|---|---|---|---|---|")
    for name, shape in SHAPES.items():
        r = measure(shape, args.images, args.streams)
        print(f"| {name} | {r['encode_ms']:.1f} ms | {r['image_ms']:.1f} ms |"
              f" {r['quiet_p50_ms']:.1f} / {r['during_p50_ms']:.1f} ms | "
              f"{r['quiet_max_ms']:.1f} / {r['during_max_ms']:.1f} ms |", flush=True)


if __name__ == "__main__":
    main()
