"""Every static generator on the demo cohort, side by side: quality, utility, privacy attacks, time.

Each row is a real federated run (`mindfed simulate`: Flower's simulation engine, the demo's 3
hospitals, 4,000 patients) of one static generator alone (no TimeGAN), at a whole-run budget of
epsilon 1 and 5 per hospital (delta 1e-5); `--hospitals 1` gives the central equivalent (one
party holding every row). Scores are against the whole demo cohort with SDMetrics' QualityReport,
and a gradient-boosting classifier of `risk_level` trained on the synthetic table is tested on
1,000 fresh demo patients; "attack AUC" is the worst membership-inference AUC of the run's audit.

    python benchmarks/static_generators.py [--epsilons 1 5] [--hospitals 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from simulation.runner import simulate

GENERATORS = {
    "pgm (mst)": ({"model": "pgm"}, {}),
    "pgm (aim)": ({"model": "pgm"}, {"model.pgm.selection": "aim"}),
    "dp-ctgan": ({"model": "dp-ctgan", "rounds": 12}, {}),
}
# The handshake keeps its demo share; the static generator gets the rest of the budget.
STATIC_SHARE = 0.8


def _row(name: str, epsilon: float, hospitals: int, out: Path) -> dict:
    stage, extra = GENERATORS[name]
    overrides = {
        "stages": [{**stage, "epsilon_share": STATIC_SHARE}],
        "privacy.max_epsilon": epsilon,
        "federation.hospitals": hospitals,
        **extra,
    }
    started = time.perf_counter()
    metrics = simulate(config=None, overrides=overrides, out_dir=out).metrics
    seconds = time.perf_counter() - started
    check = metrics["demo_check"]
    quality, utility = check["quality"], check["train_synthetic_test_real"]
    attacks = [g for g in metrics["audit"]["gates"] if g["name"] == "membership attack AUC"]
    return {
        "generator": name,
        "epsilon": epsilon,
        "hospitals": hospitals,
        "column_shapes": quality["column_shapes"],
        "pair_trends": quality["column_pair_trends"],
        "overall": quality["overall"],
        "tstr_auroc": utility["synthetic"]["auroc"],
        "tstr_macro_f1": utility["synthetic"]["macro_f1"],
        "real_auroc": utility["real"]["auroc"],
        "worst_attack_auc": attacks[0]["value"] if attacks else float("nan"),
        "audit_passed": metrics["audit"]["passed"],
        "epsilon_spent": max(h["epsilon"] for h in metrics["hospitals"]),
        "seconds": seconds,
    }


def _table(rows: list[dict]) -> str:
    head = (
        "| generator | eps | hospitals | shapes | pairs | overall | TSTR AUROC (real) | macro-F1 "
        "| attack AUC | s |"
    )
    lines = [head, "|" + " --- |" * 10]
    for r in rows:
        lines.append(
            f"| {r['generator']} | {r['epsilon']:g} | {r['hospitals']} | {r['column_shapes']:.3f} | "
            f"{r['pair_trends']:.3f} | {r['overall']:.3f} | {r['tstr_auroc']:.3f} ({r['real_auroc']:.3f}) | "
            f"{r['tstr_macro_f1']:.3f} | {r['worst_attack_auc']:.3f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 5.0])
    parser.add_argument("--hospitals", type=int, nargs="+", default=[3])
    parser.add_argument("--generators", nargs="+", default=list(GENERATORS), choices=list(GENERATORS))
    parser.add_argument("--out", type=Path, default=None, help="keep each run's folder here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = args.out or Path(scratch)
        for hospitals in args.hospitals:
            for epsilon in args.epsilons:
                for name in args.generators:
                    slug = name.replace(" ", "").replace("(", "-").rstrip(")")
                    folder = root / f"{slug}-eps{epsilon:g}-h{hospitals}"
                    rows.append(_row(name, epsilon, hospitals, folder))
                    print(_table(rows[-1:]).splitlines()[-1], flush=True)
    print(_table(rows))
    results = Path(__file__).with_name("static_generators.json")
    results.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print(f"written {results}")


if __name__ == "__main__":
    main()
