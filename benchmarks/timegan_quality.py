"""TimeGAN quality under DP in a local simulation of the federated demo (no Flower).

3 hospitals (non-iid Dirichlet split of the 4000-patient demo cohort, 80% of each trains as in
the audit's member split), phases run as FedAvg rounds with the round counts, batch size and
TimeGAN config of configs/demo.toml, every hospital with its own ledger: the nodes' own handshake
(`client.tasks.handshake_statistics`: histograms, pair tables, numeric and sequence moments) at the
demo's statistics share, a stand-in charge for the static generator's share, then TimeGAN's noise
planned to reach max epsilon.

    python benchmarks/timegan_quality.py [--patients 4000] [--eval 2000] [key=value config overrides]
"""

from __future__ import annotations

import argparse
import copy
import math
import time
import warnings

import numpy as np
import torch

from client.data import Cohort
from client.tasks import handshake_statistics, weeks_of
from configs.schema import load_schema
from configs.settings import load_settings
from models.encoder import TabularEncoder
from models.releases.numeric import NUMERIC_MOMENTS
from models.releases.sequence import SEQUENCE_MOMENTS
from models.sequence.encoder import SequenceEncoder
from models.sequence.moments import SequenceMoments
from models.sequence.timegan import TimeGAN
from models.sequence_metrics import evaluate_sequences
from models.statistics import histogram_counts, merge_histograms
from privacy.dp_training import DPSpec
from privacy.facade import steps_per_epoch
from privacy.ledger import PrivacyLedger
from simulation.cohort import DEMO_LINK_PAIRS, generate_demo_cohort
from simulation.partition import partition_cohort

SETTINGS = load_settings()
SEQUENCE_STAGE = next(stage for stage in SETTINGS.stages if stage.model == "timegan")
ROUNDS = tuple(SEQUENCE_STAGE.phase_rounds(TimeGAN.phases))
BATCH = SETTINGS.federation.batch_size
DELTA = SETTINGS.privacy.delta
CLIP = SETTINGS.privacy.clipping_norm
MAX_EPSILON = SETTINGS.privacy.max_epsilon
CONFIG = dict(SETTINGS.model.params_for("timegan"))


def _charge_to(ledger: PrivacyLedger, target: float, what: str) -> None:
    """One Gaussian release whose noise multiplier brings the ledger's spend to about `target`."""
    lo, hi = 0.05, 100.0
    for _ in range(40):
        mid = math.sqrt(lo * hi)
        trial = PrivacyLedger(
            max_epsilon=1e9, delta=ledger.delta, history=[*ledger.accountant.history, (mid, 1.0, 1)]
        )
        lo, hi = (mid, hi) if trial.spent() > target else (lo, mid)
    ledger.charge_gaussian(what, noise_multiplier=hi)


def _fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    total = float(sum(weights))
    out = {}
    for key, value in states[0].items():
        if value.is_floating_point():
            out[key] = sum(s[key] * (w / total) for s, w in zip(states, weights, strict=True))
        else:
            out[key] = value.clone()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patients", type=int, default=4000)
    parser.add_argument("--eval", type=int, default=2000, help="patients evaluated (random subset)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--statistics-share", type=float, default=None, help="privacy.statistics_epsilon_share (demo's)"
    )
    parser.add_argument(
        "--stand-ins",
        choices=("cohort", "public"),
        default="cohort",
        help="generator profiles: another demo cohort's (a perfect static generator) or public marginals",
    )
    parser.add_argument("--save", default="", help="write the trained weights and DP moments here (.pt)")
    parser.add_argument("overrides", nargs="*", help="TimeGAN config key=value")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    config = dict(CONFIG)
    for item in args.overrides:
        key, _, value = item.partition("=")
        default = TimeGAN.Config.model_fields[key].default
        if isinstance(default, bool):
            config[key] = value.lower() in ("1", "true", "yes")
        else:
            config[key] = float(value) if default is None else type(default)(value)

    schema = load_schema()
    cohort = generate_demo_cohort(args.patients, seed=args.seed)
    hospitals = partition_cohort(cohort, 3, mode="non-iid", alpha=1.0, seed=args.seed)
    seq = SequenceEncoder.from_schema(schema)
    encoder = TabularEncoder.from_histograms(
        schema, merge_histograms([histogram_counts(h.static, schema) for h in hospitals])
    )
    members = [h.static.sample(frac=0.8, random_state=args.seed) for h in hospitals]
    member_cohorts = [
        Cohort(m, h.timeseries[h.timeseries["patient_id"].isin(set(m["patient_id"]))])
        for h, m in zip(hospitals, members, strict=True)
    ]
    weeks = [weeks_of(c, schema) for c in member_cohorts]
    conds = [encoder.transform(m) for m in members]
    sizes = [len(w) for w in weeks]
    total_rounds = sum(r for _, r in ROUNDS)

    # The nodes' own handshake (client.tasks.handshake_statistics), the static generator's share,
    # TimeGAN's plan.
    ledgers, sigmas, moments = [], [], None
    rng = np.random.default_rng(args.seed)
    privacy = SETTINGS.privacy
    share = privacy.statistics_epsilon_share if args.statistics_share is None else args.statistics_share
    statistics = share * MAX_EPSILON
    static_total = statistics + SETTINGS.stages[0].epsilon_share * MAX_EPSILON
    for n, member_cohort in zip(sizes, member_cohorts, strict=True):
        ledger = PrivacyLedger(max_epsilon=MAX_EPSILON, delta=DELTA)
        seed = int(rng.integers(2**31))
        released = handshake_statistics(
            member_cohort,
            schema,
            ledger=ledger,
            epsilon=statistics,
            seed=seed,
            releases=[NUMERIC_MOMENTS, SEQUENCE_MOMENTS],
        )[SEQUENCE_MOMENTS]
        assert released is not None
        moments = released if moments is None else moments.merged(released)
        _charge_to(ledger, static_total, "static generator (stand-in)")
        per_epoch = steps_per_epoch(n, BATCH)
        sigmas.append(
            ledger.calibrate_noise_multiplier(
                target_epsilon=MAX_EPSILON, sample_rate=1 / per_epoch, steps=total_rounds * per_epoch
            )
        )
        ledgers.append(ledger)
    print(f"hospitals {sizes}, sigma {[round(s, 3) for s in sigmas]}, config {config}")

    # The federation sends profiles sampled from its DP static generator; a second demo cohort
    # (another seed, no patient in common) stands in for a perfect one here.
    stand_ins = (
        encoder.transform(generate_demo_cohort(2000, seed=args.seed + 1).static)
        if args.stand_ins == "cohort"
        else None
    )
    global_model = TimeGAN(encoder, config, seed=0)
    state = global_model.state_dict()
    server_round, timings = 0, {}
    for phase, rounds in ROUNDS:
        for _ in range(rounds):
            server_round += 1
            states, seconds = [], []
            for k in range(3):
                model = TimeGAN(encoder, config, seed=0)
                model.load_state_dict(copy.deepcopy(state))
                dp = DPSpec(sigmas[k], CLIP, ledgers[k], label=f"timegan {phase} round {server_round}")
                start = time.perf_counter()
                model.fit(
                    weeks[k],
                    conds[k],
                    phase=phase,
                    epochs=1,
                    batch_size=BATCH,
                    dp=dp,
                    device=torch.device("cpu"),
                    seed=1000 * server_round + k,
                    moments=moments,
                    stand_ins=stand_ins,
                )
                seconds.append(time.perf_counter() - start)
                states.append(model.state_dict())
            state = _fedavg(states, sizes)
            timings.setdefault(phase, []).append(max(seconds))
    global_model.load_state_dict(state)
    if args.save:
        assert moments is not None
        torch.save({"state": state, "moments": moments.to_json(), "config": config}, args.save)
    print("epsilon spent:", [round(ledger.spent(), 3) for ledger in ledgers])
    print(
        "seconds per round (slowest hospital):", {p: round(float(np.mean(t)), 2) for p, t in timings.items()}
    )

    pick = np.random.default_rng(1).permutation(args.patients)[: args.eval]
    static = cohort.static.iloc[pick].reset_index(drop=True)
    timeseries = cohort.timeseries[cohort.timeseries["patient_id"].isin(set(static["patient_id"]))]
    real = seq.transform(timeseries, static["patient_id"])
    shuffled = static.sample(frac=1.0, random_state=3).reset_index(drop=True)
    rows = {}
    # "shuffled": weeks generated for another patient's profile but scored against this patient's
    # profile. A learned link vanishes there (synthetic r ~ 0); a link that survives is spurious.
    for name, profiles in (("real profiles", static), ("shuffled profiles", shuffled)):
        syn = global_model.sample_encoded(encoder.transform(profiles), seed=11)
        rows[name] = evaluate_sequences(
            real,
            syn,
            channels=seq.channels,
            seed=0,
            real_static=static,
            syn_static=static,
            pairs=DEMO_LINK_PAIRS,
        )
    # The rhythm the generator is asked to match: real (exact), the DP target, generated.
    generated = global_model.sample_encoded(encoder.transform(static), seed=11)
    assert moments is not None
    for name, summary in (
        ("real", SequenceMoments.of(real)),
        ("dp target", moments),
        ("generated", SequenceMoments.of(generated)),
    ):
        rhythm = summary.rhythm()
        shown = {k: np.round(v.mean(axis=0) if k == "mean" else v, 3) for k, v in rhythm.items()}
        shown["within_corr"] = np.round(rhythm["within_cov"] / np.outer(*[rhythm["within_sd"]] * 2), 2)
        shown.pop("within_cov"), shown.pop("between_cov")
        print(f"{name:10s}", shown)
    sd_real = real.std(axis=(0, 1))
    sd_syn = global_model.sample_encoded(encoder.transform(static), seed=11).std(axis=(0, 1))
    print(
        "std ratio syn/real per channel:", dict(zip(seq.channels, np.round(sd_syn / sd_real, 2), strict=True))
    )
    if hasattr(global_model.embedder, "prior"):  # what the DP link prior learned (r with each column)
        with torch.no_grad():
            prior = global_model.embedder.prior(torch.from_numpy(encoder.transform(static))).numpy()
        r = {
            f"{col}~{ch}": np.corrcoef(static[col].astype(float), prior[:, seq.channels.index(ch)])[0, 1]
            for col, ch in DEMO_LINK_PAIRS
        }
        print("prior r:", {k: round(float(v), 2) for k, v in r.items()})
    keys = ["ks-mean", "discriminative", "predictive-mae", "autocorr-diff", "link-max-diff"]
    keys += [k for k in rows["real profiles"] if k.startswith("ks/")]
    keys += [k for k in rows["real profiles"] if k.startswith("link/") and not k.endswith("/diff")]
    print(f"{'metric':45s} {'real profiles':>14s} {'shuffled':>10s}")
    for key in keys:
        print(f"{key:45s} {rows['real profiles'][key]:14.3f} {rows['shuffled profiles'][key]:10.3f}")


if __name__ == "__main__":
    main()
