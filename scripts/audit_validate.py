"""Validate `lookalike audit` where the truth is known because we made it so.

    python scripts/audit_validate.py --source ../shared/datasets/mnist.npz --out docs/audit-validation.json

A 5,000-digit collection (4,000 indexed, 1,000 held out, seeded from MNIST's official splits) with
a seeded 1% of labels flipped, and 60 indexed digits copied into the held-out split: 20 exact
copies, 20 shifted by one pixel, 20 re-encoded as JPEG (quality 75). For each embedder (raw
pixels, the default VGG16 with seeded random weights, and VGG16 fine-tuned by `lookalike train` on
the noisy indexed items), the script ingests it, audits it with both label-issue scores, and
reports: precision and recall of the flipped items among the top 50 / 100 candidates; the planted
copies' distances against the median nearest-neighbour distance (what the duplicate threshold is
a multiple of) and the natural nearest-neighbour distances; and, at several threshold factors,
the recall of the planted copies and the number of other pairs reported (false positives, or
real near-duplicates MNIST holds: look at them with --out).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

FACTORS = (0.1, 0.2, 0.25, 0.3, 0.4, 0.5)


def make_npz(source: str, out: Path, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    with np.load(source) as d:
        xtr, ytr, xte, yte = d["x_train"], d["y_train"], d["x_test"], d["y_test"]
    tr = np.sort(rng.choice(len(xtr), 4000, replace=False))
    te = np.sort(rng.choice(len(xte), 940, replace=False))
    x_train, y_train = xtr[tr].copy(), ytr[tr].copy()
    x_test, y_test = xte[te].copy(), yte[te].copy()
    # planted copies of indexed digits into the held-out split
    src = rng.choice(4000, 60, replace=False)
    copies, kinds = [], []
    for n, i in enumerate(src):
        img = x_train[i]
        if n < 20:
            kinds.append("exact")
            copies.append(img.copy())
        elif n < 40:
            kinds.append("shift1")
            copies.append(np.roll(img, 1, axis=1))  # MNIST's borders are blank: a roll is a shift
        else:
            kinds.append("jpeg")
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=75)
            copies.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L")))
    x_test = np.concatenate([x_test, np.stack(copies)])
    y_test = np.concatenate([y_test, y_train[src]])
    # flip a seeded 1% of all labels (not the copies or their originals)
    pool = [("train", i) for i in range(4000) if i not in set(src.tolist())] + [("test", i) for i in range(940)]
    flips = [pool[j] for j in rng.choice(len(pool), 50, replace=False)]
    for split, i in flips:
        y = y_train if split == "train" else y_test
        y[i] = (int(y[i]) + int(rng.integers(1, 10))) % 10
    np.savez_compressed(out, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return {
        "flipped": [f"mnist:{s}:{i}" for s, i in flips],
        "copies": [(f"mnist:train:{int(i)}", f"mnist:test:{940 + n}", kinds[n]) for n, i in enumerate(src)],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default="../shared/datasets/mnist.npz")
    ap.add_argument("--out", default="audit-validation.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=6, help="fine-tuning epochs")
    ap.add_argument("--embedders", nargs="+", default=["pixels", "vgg16", "trained"])
    args = ap.parse_args()

    from lookalike.analysis.audit import audit
    from lookalike.core.gallery import Gallery
    from lookalike.core.ingest import ingest

    work = Path(tempfile.mkdtemp(prefix="lookalike-audit-"))
    npz = work / "noisy.npz"
    truth = make_npz(args.source, npz, args.seed)
    flipped = set(truth["flipped"])
    results: dict = {"seed": args.seed, "flipped": len(flipped), "copies": len(truth["copies"]), "embedders": {}}
    for name in args.embedders:
        t0 = time.perf_counter()
        db = str(work / f"db-{name}")
        if name == "pixels":
            ingest("mnist", source=str(npz), embedder="pixels", db=db, collection="audit")
        elif name == "vgg16":
            ingest("mnist", source=str(npz), embedder="vgg16", weights="random", seed=args.seed, db=db, collection="audit")
        else:
            from lookalike.models.train import train

            model = work / "model.keras"
            train("mnist", source=str(npz), out=model, weights="random", seed=args.seed, epochs=args.epochs)
            ingest("mnist", source=str(npz), model=str(model), db=db, collection="audit")
        built = time.perf_counter() - t0
        entry: dict = {"ingest_s": round(built, 1)}
        with Gallery.open("audit", db) as g:
            for method in ("vote", "margin"):
                r = audit(g, k=10, top=100, method=method)
                ranked = [s.id for s in r.suspects]
                entry[method] = {
                    f"top{n}": {
                        "precision": round(sum(i in flipped for i in ranked[:n]) / n, 3),
                        "recall": round(sum(i in flipped for i in ranked[:n]) / len(flipped), 3),
                    }
                    for n in (50, 100)
                }
                entry["audit_s"] = round(r.seconds, 2)
            # duplicate threshold: planted copies' distances against the median nearest-neighbour distance
            ids, vecs, _ = g.scan()
            row = {i: n for n, i in enumerate(ids)}
            median = r.median_nn_distance
            by_kind: dict[str, list[float]] = {}
            for a, b, kind in truth["copies"]:
                d = float(np.linalg.norm(vecs[row[a]] - vecs[row[b]]))
                by_kind.setdefault(kind, []).append(d / median)
            entry["median_nn_distance"] = median
            entry["copy_ratio_max"] = {kind: round(max(v), 4) for kind, v in by_kind.items()}
            entry["copy_ratio_median"] = {kind: round(float(np.median(v)), 4) for kind, v in by_kind.items()}
            planted = {tuple(sorted((a, b))) for a, b, _ in truth["copies"]}
            entry["factors"] = {}
            for factor in FACTORS:
                rr = audit(g, k=10, top=1, threshold=factor * median)
                found_pairs = set()
                for grp in rr.groups:
                    members = set(grp.ids)
                    found_pairs |= {p for p in planted if set(p) <= members}
                other = sum(len(grp.ids) - 1 for grp in rr.groups) - len(found_pairs)  # links not explained by a planted copy
                entry["factors"][str(factor)] = {
                    "recall": round(len(found_pairs) / len(planted), 3),
                    "by_kind": {
                        kind: round(sum(tuple(sorted((a, b))) in found_pairs for a, b, kd in truth["copies"] if kd == kind) / 20, 3)
                        for kind in ("exact", "shift1", "jpeg")
                    },
                    "other_links": other,
                    "leaked": len(rr.leaked_ids),
                    "accuracy": rr.accuracy,
                    "leak_free_accuracy": rr.leak_free_accuracy,
                }
            natural = _nn_ratios(g, median)
            entry["natural_nn_ratio_quantiles"] = {q: round(float(np.quantile(natural, float(q))), 4) for q in ("0.001", "0.01", "0.05")}
        results["embedders"][name] = entry
        print(json.dumps({name: entry}, indent=1), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def _nn_ratios(g, median: float) -> np.ndarray:
    """Every item's nearest-neighbour distance over the median, planted copies excluded (the held-out items past 940)."""
    from lookalike.analysis.audit import self_neighbours

    ids, vecs, _ = g.scan()
    keep = np.array([not (i.startswith("mnist:test:") and int(i.rsplit(":", 1)[1]) >= 940) for i in ids])
    _, dist = self_neighbours(vecs[keep], 1)
    return dist[:, 0] / median


if __name__ == "__main__":
    sys.exit(main())
