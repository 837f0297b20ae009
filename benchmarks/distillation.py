"""Knowledge distillation: a student with under a quarter of the teacher's multiply-adds,
distilled from the teacher, against the same student trained from scratch for the same epochs.

Teacher: ResNet-20 on a small shapes set (3,000 images, seed 0 for the data). Student: the small
CNN at half width. The data seed stays fixed so every run sees the same images and test split;
the run seed (initialisation, shuffling, augmentation) takes 0, 1, 2.

    python benchmarks/distillation.py         # writes benchmarks/results/distillation.json
"""

from __future__ import annotations

import statistics
import tempfile

from _common import forward_flops, write

from tfkarpa import config, tasks
from tfkarpa.models import classifiers

DATA = ["data=shapes", "data.count=3000", "data.seed=0", "data.image_size=32"]
STUDENT = ["model=small_cnn", "model.width=0.5", "epochs=6", "optimizer.lr=0.05"]
SEEDS = (0, 1, 2)


def main() -> None:
    teacher_flops = forward_flops(classifiers.resnet((32, 32, 3), 6, depth=20))
    student_flops = forward_flops(classifiers.small_cnn((32, 32, 3), 6, width=0.5))
    with tempfile.TemporaryDirectory() as tmp:
        common = [*DATA, f"runs_root={tmp}/runs", "export=false"]
        teacher = tasks.run(config.build(overrides=[*common, "model=resnet", "model.depth=20",
                                                    "epochs=15", "optimizer.lr=0.1", "name=teacher"]))
        results = {"scratch": [], "distilled": []}
        for seed in SEEDS:
            for kind in results:
                extra = [f"distill.teacher={teacher['run_dir']}"] if kind == "distilled" else []
                run = tasks.run(config.build(overrides=[*common, *STUDENT, f"seed={seed}",
                                                        f"name={kind}-{seed}", *extra]))
                results[kind].append(run["metrics"]["test_accuracy"])
                print(kind, seed, run["metrics"]["test_accuracy"])
    summary = {k: {"per_seed": v, "mean": statistics.mean(v), "stdev": statistics.stdev(v)}
               for k, v in results.items()}
    gain = summary["distilled"]["mean"] - summary["scratch"]["mean"]
    write("distillation", {
        "teacher": {"model": "resnet20", "test_accuracy": teacher["metrics"]["test_accuracy"],
                    "forward_gflops": teacher_flops / 1e9},
        "student": {"model": "small_cnn width 0.5", "forward_gflops": student_flops / 1e9,
                    "flops_over_teacher": student_flops / teacher_flops, "epochs": 6},
        "data": DATA, "seeds": SEEDS, **summary,
        "gain_points": 100 * gain,
        "distilled_beats_scratch_every_seed": all(
            d > s for d, s in zip(results["distilled"], results["scratch"])),
    })
    print(f"distillation gain: {100 * gain:+.2f} points")


if __name__ == "__main__":
    main()
