"""Ingest speed and memory on folders of large photos, against the same photos shrunk beforehand.

Makes seeded, photo-like 3000x2000 colour JPEGs (about 0.67 MB each; the issue's phone photos were
0.8 MB) in two labels (and 64x64 copies of each), then runs
``lookalike ingest folder`` on each folder in a child process with random VGG16 weights, and
reports images/s (from the first batch to the last: the model's and the store's start-up excluded), the decode
and embed rates, and the child's peak RSS. The photos are kept in ``--workdir`` between runs.

    python scripts/photos.py --counts 120 1200 --json docs/photos.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CHILD = """
import json, resource, sys
from lookalike.core.ingest import ingest
r = ingest("folder", sys.argv[1], embedder="vgg16", input_size=32, fit="squash", weights="random", db=sys.argv[2], test_size=0.1,
           batch_size=int(sys.argv[3]))
out = r.to_dict()
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({k: out[k] for k in ("images_per_s", "decode_images_per_s", "embed_images_per_s", "seconds",
                                       "decode_seconds", "embed_seconds", "write_seconds", "peak_rss_mb", "added")}))
"""


def make_photos(root: Path, count: int, seed: int = 0) -> tuple[Path, Path]:
    """``count`` 3000x2000 JPEGs (quality 90) in ``root/full/{a,b}`` and their 64x64 copies in ``root/small``."""
    from PIL import Image

    full, small = root / f"full-{count}", root / f"small-{count}"
    if (full / "done").exists():
        return full, small
    rng = np.random.default_rng(seed)
    for i in range(count):
        label = "a" if i % 2 else "b"
        for d in (full, small):
            (d / label).mkdir(parents=True, exist_ok=True)
        tint = np.array([1.0, 0.8, 0.6]) if label == "a" else np.array([0.6, 0.8, 1.0])
        low = rng.random((20, 30, 3)) * 255 * tint  # a smooth scene, upsampled, with fine grain on top
        img = Image.fromarray(low.astype(np.uint8)).resize((3000, 2000), Image.BICUBIC)
        grain = rng.integers(-2, 3, (2000, 3000, 1), dtype=np.int16)
        img = Image.fromarray(np.clip(np.asarray(img, np.int16) + grain, 0, 255).astype(np.uint8))
        img.save(full / label / f"{i:05d}.jpg", quality=90)
        img.resize((64, 64), Image.BILINEAR).save(small / label / f"{i:05d}.jpg", quality=90)
    (full / "done").write_text("ok")
    return full, small


def run(folder: Path, db: Path, batch_size: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(db), str(batch_size)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"ingest of {folder} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[120, 1200])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "lookalike-photos"))
    ap.add_argument("--json")
    args = ap.parse_args()
    root = Path(args.workdir)
    rows = []
    for count in args.counts:
        t = time.perf_counter()
        full, small = make_photos(root, count)
        made = time.perf_counter() - t
        size_mb = sum(p.stat().st_size for p in full.rglob("*.jpg")) / 1e6
        for kind, folder in (("3000x2000 photos", full), ("pre-shrunk 64x64", small)):
            db = root / f"db-{kind[:3]}-{count}-{time.time_ns()}"
            r = run(folder, db, args.batch_size)
            rows.append({"photos": count, "kind": kind, "folder_mb": size_mb if kind.startswith("3000") else None, **r})
            print(
                f"{count:>5} {kind:<18} {r['images_per_s']:7.1f} images/s  (decode {r['decode_images_per_s']:7.1f}/s, "
                f"embed {r['embed_images_per_s']:7.1f}/s)  peak RSS {r['peak_rss_mb']:6.0f} MB"
                + (f"  [{size_mb:.0f} MB of JPEG, made in {made:.0f} s]" if kind.startswith("3000") else ""),
                flush=True,
            )
        ratio = rows[-2]["images_per_s"] / rows[-1]["images_per_s"]
        rows[-2]["ratio_to_preshrunk"] = ratio
        print(f"{count:>5} photos / pre-shrunk speed ratio {ratio:.2f}", flush=True)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "batch_size": args.batch_size,
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
