"""MixUp, CutMix and stochastic depth against plain training: accuracy and calibration.

Issue (training techniques): `data.mix=mixup|cutmix` and `model.drop_path` are switches on
`train`; this measures what each does to test accuracy and expected calibration error (ECE,
15 bins) on digits with a ResNet-8 for 15 epochs, three seeds each (the same data split:
data.seed=0), everything else the defaults.

    python benchmarks/regularisation.py                  # every case
    python benchmarks/regularisation.py --only mixup     # some cases, keeping the others'

Every run is the CLI in a fresh process (`python -m pipelines train ... --json`); each case is
written into benchmarks/results/regularisation.json as it finishes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, mean_std, write

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["data=digits", "data.seed=0", "model=resnet", "model.depth=8", "epochs=15",
          "export=false"]
SEEDS = (0, 1, 2)
CASES = {
    "plain": [],
    "mixup": ["data.mix=mixup"],
    "cutmix": ["data.mix=cutmix"],
    "drop_path_0.2": ["model.drop_path=0.2"],
}


def run_once(name: str, extra: list[str], seed: int, tmp: str) -> dict:
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "pipelines", "train", *COMMON, *extra,
                          f"seed={seed}", f"run_dir={tmp}/{name}-{seed}", "--json", "--quiet"],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{name} seed {seed} failed:\n{out.stderr[-3000:]}")
    m = json.loads(out.stdout.strip().splitlines()[-1])["metrics"]
    return {"seed": seed, "test_accuracy": round(m["test_accuracy"], 4),
            "test_ece": round(m["test_ece"], 4), "fit_seconds": m["fit_seconds"],
            "wall_seconds": round(time.time() - started, 1)}


def summarise(runs: list[dict]) -> dict:
    return mean_std(runs, ("test_accuracy", "test_ece"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    path = RESULTS / "regularisation.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    cases = result.get("cases", {})
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            runs = []
            for seed in SEEDS:
                runs.append(run_once(name, CASES[name], seed, tmp))
                print(f"{name} seed {seed}: {runs[-1]}", flush=True)
            cases[name] = {"command": " ".join(["python -m pipelines train", *COMMON,
                                                 *CASES[name], "seed=S"]),
                           **summarise(runs), "runs": runs}
            plain = cases.get("plain")
            for case in cases.values():  # ratios against plain training, from this file's runs
                if plain:
                    case["accuracy_points_vs_plain"] = round(
                        100 * (case["test_accuracy_mean"] - plain["test_accuracy_mean"]), 2)
                    case["ece_vs_plain"] = round(case["test_ece_mean"] - plain["test_ece_mean"], 4)
            result = {"benchmark": "regularisation", "setup": {
                "data": "digits (1797 8x8 images, upscaled to the auto image size), data.seed=0",
                "model": "resnet depth 8", "epochs": 15, "seeds": list(SEEDS),
                "ece": "expected calibration error, 15 equal-width confidence bins"},
                "cases": cases}
            write("regularisation", result)
    print(json.dumps({k: {m: v for m, v in c.items() if m != "runs"} for k, c in cases.items()},
                     indent=1))


if __name__ == "__main__":
    main()
