"""Every static generator on the demo cohort, side by side: quality, utility, privacy attacks, time.

Each row is a real federated run (`mindfed simulate`: Flower's simulation engine, the demo's 3
hospitals, 4,000 patients) of one static generator alone (no TimeGAN), at a whole-run budget of
epsilon 1 and 5 per hospital (delta 1e-5); `--hospitals 1` gives the central equivalent (one
party holding every row). Scores are against the whole demo cohort with SDMetrics' QualityReport,
and a gradient-boosting classifier of `risk_level` trained on the synthetic table is tested on
1,000 fresh demo patients; "attack AUC" is the worst membership-inference AUC of the run's audit.

    python benchmarks/static_generators.py [--epsilons 1 5] [--hospitals 3] [--seeds 7] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from simulation.runner import simulate

# The handshake and the audit keep their demo shares; the static stages get the rest of the budget.
STATIC_SHARE = 0.75
# hhg refines pgm's cells: pgm keeps all but this share, hhg's three DP-SGD phases take it.
HHG_SHARE = 0.1
_HHG_PHASES = {"vae": 3, "diffusion": 3, "refine": 2}


def _hhg(sample_with: str) -> tuple[list[dict], dict]:
    stages = [
        {"model": "pgm", "epsilon_share": STATIC_SHARE - HHG_SHARE},
        {"model": "hhg", "phases": _HHG_PHASES, "epsilon_share": HHG_SHARE},
    ]
    return stages, {"model.hhg.sample_with": sample_with}


# name -> (the plan's static stages, other overrides)
GENERATORS: dict[str, tuple[list[dict], dict]] = {
    "pgm (mst)": ([{"model": "pgm", "epsilon_share": STATIC_SHARE}], {}),
    "pgm (aim)": ([{"model": "pgm", "epsilon_share": STATIC_SHARE}], {"model.pgm.selection": "aim"}),
    "dp-ctgan": ([{"model": "dp-ctgan", "rounds": 12, "epsilon_share": STATIC_SHARE}], {}),
    # the ablation: decode latents drawn from N(0, I), from the latent diffusion, then refined
    "hhg (vae only)": _hhg("vae"),
    "hhg (vae + diffusion)": _hhg("diffusion"),
    "hhg (full)": _hhg("full"),
}


def _row(name: str, epsilon: float, hospitals: int, seed: int, out: Path) -> dict:
    stages, extra = GENERATORS[name]
    overrides = {
        "stages": stages,
        "risk.synthetic_models": [],  # static generators alone: no risk model, no risk evaluation
        "privacy.max_epsilon": epsilon,
        "federation.hospitals": hospitals,
        "federation.seed": seed,
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
        "seed": seed,
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
        "| generator | eps | hospitals | seed | shapes | pairs | overall | TSTR AUROC (real) | macro-F1 "
        "| attack AUC | audit | s |"
    )
    lines = [head, "|" + " --- |" * 12]
    for r in rows:
        lines.append(
            f"| {r['generator']} | {r['epsilon']:g} | {r['hospitals']} | {r['seed']} | "
            f"{r['column_shapes']:.3f} | "
            f"{r['pair_trends']:.3f} | {r['overall']:.3f} | {r['tstr_auroc']:.3f} ({r['real_auroc']:.3f}) | "
            f"{r['tstr_macro_f1']:.3f} | {r['worst_attack_auc']:.3f} | "
            f"{'PASS' if r['audit_passed'] else 'FAIL'} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 5.0])
    parser.add_argument("--hospitals", type=int, nargs="+", default=[3])
    parser.add_argument("--generators", nargs="+", default=list(GENERATORS), choices=list(GENERATORS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[7])
    parser.add_argument("--out", type=Path, default=None, help="keep each run's folder here")
    parser.add_argument("--results", type=Path, default=Path(__file__).with_name("static_generators.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        root = args.out or Path(scratch)
        runs = [
            (h, e, s, g)
            for h in args.hospitals
            for e in args.epsilons
            for s in args.seeds
            for g in args.generators
        ]
        for hospitals, epsilon, seed, name in runs:
            slug = "".join(c if c.isalnum() else "-" for c in name)
            folder = root / f"{slug}-eps{epsilon:g}-h{hospitals}-s{seed}"
            rows.append(_row(name, epsilon, hospitals, seed, folder))
            print(_table(rows[-1:]).splitlines()[-1], flush=True)
    print(_table(rows))
    args.results.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    print(f"written {args.results}")


if __name__ == "__main__":
    main()
