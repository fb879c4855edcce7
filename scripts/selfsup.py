"""Self-supervised embedders on MNIST, measured as a user runs them: train without labels, ingest, evaluate.

    python scripts/selfsup.py --source ../shared/datasets/mnist.npz --protocols seed full \\
        --budgets epochs=40 minutes=10 minutes=20 minutes=30 --workdir /tmp/lk-ssl --json docs/selfsup.json

For each protocol (``seed``: 4,000 indexed and 1,000 held out, ``--limit 5000 --test-size 1000``;
``full``: the official 60,000 / 10,000) and each budget, in their own processes:

1. ``lookalike train mnist --self-supervised --epochs N`` (or ``--minutes M``) on the indexed images,
   their labels never read;
2. ``lookalike ingest mnist --model FILE`` of the same protocol into a new collection;
3. ``lookalike evaluate --json``: 1-NN accuracy through the store (and exact), MAP@R.

Each row gives the method, backbone, epochs run, training minutes, 1-NN and MAP@R; ``--train-args``
passes more options to ``lookalike train`` (another backbone, temperature, batch) for a labelled row.
Models and collections are kept in ``--workdir`` and reused (a row is measured once; ``--fresh`` forgets
the JSON's rows). ``--markdown`` prints the table of ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LOOKALIKE = str(Path(sys.executable).with_name("lookalike"))
PROTOCOLS = {"seed": ["--limit", "5000", "--test-size", "1000"], "full": []}


def run(argv: list[str]) -> tuple[str, float]:
    """Run a lookalike command; its stdout and wall seconds (SystemExit with its last stderr lines when it fails)."""
    t = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed ({done.returncode}): {done.stderr[-800:]}")
    return done.stdout, time.perf_counter() - t


def measure(protocol: str, budget: str, args: argparse.Namespace) -> dict[str, Any]:
    kind, value = budget.split("=")
    extra = shlex.split(args.train_args)
    tag = f"{protocol}-{kind}{value}" + (f"-{args.name}" if args.name else "")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"{tag}.keras"
    data = ["mnist", "--source", args.source, *PROTOCOLS[protocol]]
    if not model.exists():  # (a killed run resumes from its checkpoint)
        _, wall = run([LOOKALIKE, "train", *data, "--self-supervised", f"--{kind}", value, "--out", str(model), *extra, "--json"])
        print(f"  trained {tag} in {wall / 60:.1f} min", flush=True)
    desc = _description(model)
    db = work / "db"
    ingested, ingest_s = run([LOOKALIKE, "ingest", *data, "--model", str(model), "--db", str(db), "--collection", tag, "--json"])
    evaluated, _ = run([LOOKALIKE, "evaluate", "--db", str(db), "--collection", tag, "--json"])
    e = json.loads(evaluated)
    retrieval = e.get("retrieval", {})
    return {
        "protocol": protocol,
        "budget": budget,
        "name": args.name or "",
        "train_args": args.train_args,
        "method": desc["method"],
        "backbone": desc["base"],
        "augment": desc["augment"],
        "epochs_run": desc["epochs_run"],
        "epochs_planned": desc["epochs"],
        "train_minutes": desc["train_seconds"] / 60,
        "final_loss": desc["history"][-1]["loss"],
        "n_images": desc["n_images"],
        "one_nn": e["accuracy_1nn"] or e["accuracy"],
        "exact_one_nn": e["exact_accuracy"],
        "map_at_r": retrieval.get("store", {}).get("map_at_r"),
        "exact_map_at_r": retrieval.get("exact", {}).get("map_at_r"),
        "n_queries": e["n_queries"],
        "n_indexed": e["n_indexed"],
        "ingest_s": ingest_s,
        "ingest": json.loads(ingested).get("embedder"),
    }


def _description(model: Path) -> dict[str, Any]:
    from lookalike.models.embedder import read_model_description

    return read_model_description(model)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| protocol | method | backbone | budget | epochs | training min | 1-NN (store) | exact 1-NN | MAP@R |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        what = f"{r['method']}" + (f" ({r['name']})" if r["name"] else "")
        m = "-" if r["map_at_r"] is None else f"{r['map_at_r']:.4f}"
        lines.append(
            f"| {r['protocol']} | {what} | {r['backbone']} | {r['budget']} | {r['epochs_run']} | {r['train_minutes']:.1f} | "
            f"{r['one_nn']:.4f} | {r['exact_one_nn']:.4f} | {m} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", help="MNIST in Keras's .npz layout")
    ap.add_argument("--protocols", nargs="+", default=["seed", "full"], choices=list(PROTOCOLS))
    ap.add_argument("--budgets", nargs="+", default=["minutes=30"], help="epochs=N or minutes=M, one training each")
    ap.add_argument("--train-args", default="", help="more options for lookalike train (quoted)")
    ap.add_argument("--name", default="", help="a label for these rows (needed with --train-args)")
    ap.add_argument("--workdir", default="/tmp/lk-ssl")
    ap.add_argument("--json", default="docs/selfsup.json")
    ap.add_argument("--fresh", action="store_true", help="forget the rows in --json")
    ap.add_argument("--markdown", action="store_true", help="print the table of --json, run nothing")
    args = ap.parse_args()
    path = Path(args.json)
    state = json.loads(path.read_text()) if path.is_file() and not args.fresh else {"rows": []}
    if args.markdown:
        print(markdown(state["rows"]))
        return 0
    if not args.source:
        ap.error("--source is needed to measure")
    if args.train_args and not args.name:
        ap.error("--train-args needs --name (the rows' label)")
    for budget in args.budgets:
        if not (budget.startswith(("epochs=", "minutes=")) and budget.split("=")[1].replace(".", "", 1).isdigit()):
            ap.error(f"--budgets {budget!r}: give epochs=N or minutes=M")
    for protocol in args.protocols:
        for budget in args.budgets:
            key = (protocol, budget, args.name)
            if any((r["protocol"], r["budget"], r["name"]) == key for r in state["rows"]):
                print(f"  {protocol} {budget} {args.name}: measured already", flush=True)
                continue
            row = measure(protocol, budget, args)
            state["rows"].append(row)
            state["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(), "processor": platform.processor()}
            path.write_text(json.dumps(state, indent=1) + "\n")
            print(f"  {protocol} {budget}: 1-NN {row['one_nn']:.4f}, MAP@R {row['map_at_r']}, {row['train_minutes']:.1f} min", flush=True)
    print(markdown(state["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
