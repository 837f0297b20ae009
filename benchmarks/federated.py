"""Federated training against centralised training on the same data and total epochs.

Target (issue: federated learning): on shapes, 10 clients with Dirichlet(0.3) label skew, the
better of FedAvg and FedProx within 3 points of centralised training's test accuracy, with the
same number of passes over the data: 30 rounds x 0.5 of the clients x 3 local epochs = 45
epochs' worth, against `train epochs=45`, both at batch 16 (the federate recipe's). Also, at
10 rounds (shorter: each 30-round case takes 12-25 minutes on this 2-core machine): FedAdam, and
differential privacy at two noise levels with the epsilon each spends; and the bytes each
client sends and receives per round.

    python benchmarks/federated.py                       # every case
    python benchmarks/federated.py --only fedadam        # some cases, keeping the others'

Every case is the CLI in a fresh process (`python -m pipelines federate|train ... --json`);
each finished case is written into benchmarks/results/federated.json at once.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, write

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["data=shapes", "model=small_cnn", "batch_size=16", "seed=0", "export=false"]
LOCAL_EPOCHS = 3  # the federate recipe's
FED = ["clients=10", "fraction=0.5", f"local_epochs={LOCAL_EPOCHS}", "partition=dirichlet:0.3"]
GAP_TARGET = 3.0  # points


def _federate(rounds: int, *extra: str) -> list[str]:
    return ["federate", *FED, f"rounds={rounds}", *extra]


CASES = {
    "centralised": ["train", f"epochs={int(30 * 0.5 * LOCAL_EPOCHS)}"],
    "fedavg": _federate(30, "strategy.fl=fedavg"),
    "fedprox": _federate(30, "strategy.fl=fedprox", "proximal_mu=0.01"),
    "fedadam_10_rounds": _federate(10, "strategy.fl=fedadam", "server_lr=0.01"),
    "fedadam_10_rounds_lr_0.001": _federate(10, "strategy.fl=fedadam", "server_lr=0.001"),
    "fedavg_10_rounds": _federate(10, "strategy.fl=fedavg"),
    "fedavg_10_rounds_dp_noise_0.1": _federate(10, "dp.clip=1.0", "dp.noise=0.1"),
    "fedavg_10_rounds_dp_noise_0.5": _federate(10, "dp.clip=1.0", "dp.noise=0.5"),
}


def run_case(name: str, args: list[str], tmp: str) -> dict:
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "pipelines", *args, *COMMON,
                          f"run_dir={tmp}/{name}", "--json", "--quiet"],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    m = json.loads(out.stdout.strip().splitlines()[-1])["metrics"]
    return row_of(m, args, time.time() - started)


def row_of(m: dict, args: list[str], wall: float) -> dict:
    row = {"command": " ".join(["python -m pipelines", *args, *COMMON]),
           "test_accuracy": round(m["test_accuracy"], 4), "fit_seconds": m["fit_seconds"],
           "wall_seconds": round(wall, 1), "params": m["params"]}
    for key in ("rounds", "bytes_per_client_round", "epsilon", "delta", "final_val_accuracy"):
        if m.get(key) is not None:
            row[key] = m[key]
    return row


def summary(cases: dict) -> dict:
    if not all(k in cases for k in ("centralised", "fedavg", "fedprox")):
        return {}
    central = cases["centralised"]["test_accuracy"]
    best = max(("fedavg", "fedprox"), key=lambda k: cases[k]["test_accuracy"])
    gap = round(100 * (central - cases[best]["test_accuracy"]), 2)
    return {"centralised_epochs": int(30 * 0.5 * LOCAL_EPOCHS), "rounds": 30,
            "better_of_fedavg_fedprox": best, "gap_points": gap,
            "gap_target_points": GAP_TARGET, "gap_met": gap <= GAP_TARGET}


def record(name: str, row: dict) -> None:
    path = RESULTS / "federated.json"
    before = json.loads(path.read_text()) if path.is_file() else {}
    cases = {**before.get("cases", {}), name: row}
    write("federated", {"cases": cases, "summary": summary(cases),
                        **({"notes": before["notes"]} if "notes" in before else {})})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(CASES), help="measure these cases "
                        "only, keeping the others' figures in federated.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only or CASES:
            row = run_case(name, CASES[name], tmp)
            print(f"{name:<32} test accuracy {row['test_accuracy']:.4f} ({row['wall_seconds']} s)",
                  flush=True)
            record(name, row)


if __name__ == "__main__":
    main()
