"""Every registered backbone at 224 px on this CPU: embedding speed, memory, FLOPs, and end to end on photos.

For each backbone (random weights: none can be downloaded here; speed does not depend on the
weights), in a fresh child process each:

* **embed**: images/s of ``Embedder.embed`` on 224 x 224 images, float32 and bfloat16, at each
  ``--batch-sizes`` (images per model call), the best kept; the child's peak RSS;
* **FLOPs** per image (TensorFlow's profiler on the frozen graph: multiply and add counted apart)
  and the achieved GFLOP/s at the best float32 and bfloat16 rates;
* **Keras's published CPU time** per inference step (batch 32, a 92-core AMD EPYC) beside ours at
  batch 32, as a ratio, where Keras publishes one;
* **end to end**: ``lookalike ingest folder`` of ``--photos`` seeded, photo-like 3000x2000 JPEGs
  (scripts/photos.py's) with the backbone at its defaults for photos (224 px, centre crop, the CPU's
  default precision): images/s, and the decode and embed stages apart.

    python scripts/backbones.py --json docs/backbones.json
    python scripts/backbones.py --backbones vgg16 --json docs/backbones.json   # measures vgg16 again, keeps the other rows
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

EMBED_CHILD = """
import json, os, resource, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ["LOOKALIKE_RUNTIME"] = "tensorflow"  # ONNX Runtime measured apart, below
import numpy as np
from lookalike.models.embedder import build_embedder, make_spec
name, seconds, sizes = sys.argv[1], float(sys.argv[2]), [int(b) for b in sys.argv[3].split(",")]
rng = np.random.default_rng(0)
images = list(rng.integers(0, 256, (max(sizes) * 2, 224, 224, 3), dtype=np.uint8))
out = {"name": name, "rates": {}}
for precision in ("float32", "bfloat16"):
    emb = build_embedder(make_spec(name, weights="random", input_size=224, precision=precision))
    if precision == "float32":
        import tensorflow as tf
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
        from tensorflow.python.profiler import model_analyzer, option_builder
        model = emb._model
        fn = tf.function(lambda x: model(x, training=False))
        frozen = convert_variables_to_constants_v2(fn.get_concrete_function(tf.TensorSpec([1, 224, 224, 3], tf.float32)))
        opts = option_builder.ProfileOptionBuilder.float_operation()
        opts["output"] = "none"
        out["gflops"] = model_analyzer.profile(graph=frozen.graph, options=opts).total_float_ops / 1e9
        out["params"] = int(model.count_params())
    for b in sizes:
        emb.batch_size = b
        batch = images[:b]
        emb.embed(batch)  # traces this batch shape
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or done < 2 * b:
            emb.embed(batch)
            done += b
        out["rates"][f"{precision}/{b}"] = done / (time.perf_counter() - started)
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
from lookalike.models import onnxrt
if onnxrt.installed():  # float32 on ONNX Runtime, converted into a fresh cache (the conversion's time counted apart)
    import tempfile
    os.environ.update({"LOOKALIKE_CACHE": tempfile.mkdtemp(), onnxrt.RUNTIME_ENV: "onnx"})
    started = time.perf_counter()
    emb = build_embedder(make_spec(name, weights="random", input_size=224, precision="float32"))
    out["onnx_first_build_s"] = time.perf_counter() - started
    out["onnx"] = emb.runtime == "onnx"
    for b in sizes if out["onnx"] else ():
        emb.batch_size = b
        emb.embed(images[:b])
        done, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds or done < 2 * b:
            emb.embed(images[:b])
            done += b
        out["rates"][f"onnx/{b}"] = done / (time.perf_counter() - started)
print(json.dumps(out))
"""

INGEST_CHILD = """
import json, resource, sys
from lookalike.core.ingest import ingest
r = ingest("folder", sys.argv[1], embedder=sys.argv[2], weights="random", db=sys.argv[3], test_size=0.1)
out = r.to_dict()
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({k: out[k] for k in ("embedder", "images_per_s", "decode_images_per_s", "embed_images_per_s", "seconds",
                                       "decode_seconds", "embed_seconds", "write_seconds", "peak_rss_mb", "added", "runtime")}))
"""


def child(code: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise SystemExit(f"child failed ({args[:2]}): {out.stderr.strip().splitlines()[-3:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from lookalike.models.backbones import BACKBONES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    ap.add_argument("--batch-sizes", default="8,32,64", help="images per model call, comma-separated")
    ap.add_argument("--seconds", type=float, default=5.0, help="time spent on each measurement")
    ap.add_argument("--photos", type=int, default=480, help="3000x2000 JPEGs for the end-to-end ingest (0: skip)")
    ap.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "lookalike-photos"))
    ap.add_argument("--json")
    ap.add_argument("--photos-only", action="store_true", help="measure the end-to-end ingest only; keep --json's other figures")
    ap.add_argument("--repeats", type=int, default=3, help="end-to-end ingests of each runtime (the median kept)")
    ap.add_argument("--runtimes", nargs="+", default=["auto", "tensorflow"], help="$LOOKALIKE_RUNTIME of each end-to-end ingest")
    args = ap.parse_args()
    photos = None
    if args.photos:
        from photos import make_photos

        photos, _ = make_photos(Path(args.workdir), args.photos)
    rows = []
    for name in args.backbones:
        b = BACKBONES[name]
        t = time.perf_counter()
        if args.photos_only:
            row = next(r for r in json.loads(Path(args.json).read_text())["rows"] if r["name"] == name)
        else:
            row = child(EMBED_CHILD, name, str(args.seconds), args.batch_sizes)
            row["measure_seconds"] = round(time.perf_counter() - t, 1)
        for precision in ("float32", "bfloat16", "onnx"):
            if not any(k.startswith(precision) for k in row["rates"]):
                continue
            best = max((k for k in row["rates"] if k.startswith(precision)), key=lambda k: row["rates"][k])
            row[f"{precision}_images_per_s"] = row["rates"][best]
            row[f"{precision}_best_batch"] = int(best.split("/")[1])
            row[f"{precision}_gflop_per_s"] = row["gflops"] * row["rates"][best]
        at32 = row["rates"].get("float32/32")
        row["ms_per_batch32_float32"] = 32_000 / at32 if at32 else None
        row["keras_cpu_ms"] = b.keras_cpu_ms
        row["ratio_to_keras"] = row["ms_per_batch32_float32"] / b.keras_cpu_ms if at32 and b.keras_cpu_ms else None
        row["top1"], row["knn"], row["sources"] = b.top1, b.knn, list(b.sources)
        if "onnx_images_per_s" in row:
            row["onnx_speedup"] = row["onnx_images_per_s"] / row["float32_images_per_s"]
        for runtime in args.runtimes if photos is not None else ():
            from lookalike.models import onnxrt

            runs = []
            with tempfile.TemporaryDirectory() as cache:  # fresh: the first ingest pays any ONNX conversion
                for _ in range(args.repeats):
                    with tempfile.TemporaryDirectory() as db:
                        t = time.perf_counter()
                        e2e = child(INGEST_CHILD, str(photos), name, db, env={onnxrt.RUNTIME_ENV: runtime, "LOOKALIKE_CACHE": cache})
                        e2e["command_seconds"] = time.perf_counter() - t  # the whole child: Python, TensorFlow, model, store
                    runs.append(e2e)
            e2e = sorted(runs, key=lambda r: r["images_per_s"])[len(runs) // 2]  # the median run
            e2e["runs_images_per_s"] = [r["images_per_s"] for r in runs]
            e2e["first_command_seconds"] = runs[0]["command_seconds"]
            row["photos" if runtime == "auto" else f"photos_{runtime}"] = e2e
        rows.append(row)
        e2e = row.get("photos", {})
        print(
            f"{name:<18} f32 {row['float32_images_per_s']:6.1f}/s (b{row['float32_best_batch']}) "
            f"bf16 {row['bfloat16_images_per_s']:6.1f}/s (b{row['bfloat16_best_batch']}) "
            f"onnx {row.get('onnx_images_per_s', 0):6.1f}/s "
            f"{row['gflops']:6.2f} GFLOP {row['float32_gflop_per_s']:6.1f} GFLOP/s  rss {row['peak_rss_mb']:5.0f} MB  "
            f"photos {e2e.get('images_per_s', 0):5.1f}/s (decode {e2e.get('decode_images_per_s', 0):5.0f}/s, "
            f"embed {e2e.get('embed_images_per_s', 0):5.1f}/s)",
            flush=True,
        )
    if args.json:
        machine = {"python": platform.python_version(), "machine": platform.machine(), "processor": _cpu()}
        path = Path(args.json)
        if path.is_file():  # a run of some backbones replaces their rows only
            measured = {r["name"] for r in rows}
            before = {r["name"]: r for r in json.loads(path.read_text())["rows"]}
            for r in rows:  # a run with --photos 0 keeps the earlier end-to-end figures
                r.update({k: v for k, v in before.get(r["name"], {}).items() if k.startswith("photos") and k not in r})
            kept = [r for name, r in before.items() if name not in measured]
            rows = sorted(kept + rows, key=lambda r: list(BACKBONES).index(r["name"]))
        n_photos = args.photos or (json.loads(path.read_text()).get("photos", 0) if path.is_file() else 0)
        path.write_text(json.dumps({"machine": machine, "photos": n_photos, "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
