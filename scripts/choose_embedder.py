"""Measure 1-NN accuracy of VGG16 layer/pooling/normalisation choices on the seed protocol.

    python scripts/choose_embedder.py --source ../shared/datasets/mnist.npz [--weights random] [--input-size 32]

The seed protocol: the first 5,000 MNIST training digits, the first 1,000 held out, 1-NN (exact,
Euclidean) against the other 4,000. This is the evidence behind lookalike's default embedder
(docs/embedder.md). Weights: ``random`` (seeded, as ``--weights random``),
``imagenet`` (needs internet once) or a weights file.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lookalike.analysis.metrics import exact_neighbours
from lookalike.data.datasets import load_dataset
from lookalike.data.images import resize
from lookalike.models.backend import make_vgg16
from lookalike.models.embedder import PixelEmbedder, make_spec

LAYERS = ["block2_pool", "block3_pool", "block4_conv3", "block4_pool", "block5_conv3", "block5_pool"]


def one_nn(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray) -> float:
    idx, _ = exact_neighbours(test, train, 1)
    return float((y_train[idx[:, 0]] == y_test).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True, help="MNIST .npz in Keras's layout")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--input-size", type=int, default=32)
    ap.add_argument("--limit", type=int, default=5000)
    ap.add_argument("--test-size", type=int, default=1000)
    args = ap.parse_args()

    ds = load_dataset("mnist", source=args.source, limit=args.limit, test_size=args.test_size)
    images = ds.load(ds.items)
    labels = np.array([it.label for it in ds.items])
    test = np.array([it.split == "test" for it in ds.items])
    pixels = PixelEmbedder().embed(images)
    print(f"raw pixels (784-d): 1-NN {one_nn(pixels[~test], labels[~test], pixels[test], labels[test]):.4f}")

    import keras
    from keras.applications.vgg16 import preprocess_input

    spec = make_spec("vgg16", weights=args.weights, layer="block5_pool", input_size=args.input_size)
    base = make_vgg16(spec)
    model = keras.Model(base.input, [base.get_layer(name).output for name in LAYERS])  # base ends at block5_pool
    x = preprocess_input(np.stack([resize(im, args.input_size, "RGB") for im in images]))
    t = time.perf_counter()
    outs = model.predict(x, batch_size=128, verbose=0)
    print(f"VGG16 {args.weights} weights, {args.input_size}px: embedded {len(x)} images in {time.perf_counter() - t:.1f} s")
    print(f"{'layer':<14}{'pooling':<9}{'normalize':<11}{'dim':>6}  1-NN")
    for name, out in zip(LAYERS, outs):
        for pooling in ("flatten", "avg", "max"):
            f = out.reshape(len(out), -1) if pooling == "flatten" else (out.mean((1, 2)) if pooling == "avg" else out.max((1, 2)))
            for norm in ("none", "l2"):
                g = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12) if norm == "l2" else f
                acc = one_nn(g[~test], labels[~test], g[test], labels[test])
                print(f"{name:<14}{pooling:<9}{norm:<11}{g.shape[1]:>6}  {acc:.4f}", flush=True)


if __name__ == "__main__":
    main()
