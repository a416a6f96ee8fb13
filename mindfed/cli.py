"""The `mindfed` command line: parses arguments and calls the packages, nothing more."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

# Before anything imports Flower: its telemetry would reach for the network at every run.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import typer
import typer.core
from rich.console import Console
from rich.logging import RichHandler

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="MindFed: federated, DP synthetic cohorts."
)
certs_app = typer.Typer(no_args_is_help=True, help="TLS and node-authentication material for deployment.")
app.add_typer(certs_app, name="certs")
console = Console(stderr=True)


def _setup_logging(verbose: bool) -> None:
    handler = RichHandler(console=console, show_path=False, level=logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler])
    # Flower and Ray are chatty: keep their warnings, and their info lines only with --verbose.
    quiet = logging.INFO if verbose else logging.WARNING
    for name in ("flwr", "ray", "filelock", "alembic", "opacus"):
        logging.getLogger(name).setLevel(quiet)
    import flwr.common.logger  # noqa: F401  (Flower adds its console handler on import)

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.propagate = False  # Flower prints through its own console handler
    for flwr_handler in flwr_logger.handlers:
        flwr_handler.setLevel(quiet)
    warnings.filterwarnings("ignore", module="opacus")
    warnings.filterwarnings("ignore", message=".*Full backward hook.*")


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code=2)


@contextlib.contextmanager
def _user_errors(*extra: type[Exception]) -> Iterator[None]:
    """Errors about the user's input become one clear message and exit code 2."""
    from client.data import CohortValidationError
    from configs.errors import ConfigError
    from models.bundle import BundleError
    from server.checkpoint import CheckpointError
    from server.handshake import HandshakeError

    known = (
        ConfigError,
        BundleError,
        CohortValidationError,
        HandshakeError,
        CheckpointError,
        FileExistsError,
        NotADirectoryError,
    )
    try:
        yield
    except (*known, *extra) as err:
        _fail(str(err))


@app.command()
def simulate(
    config: Annotated[
        Path | None, typer.Option(help="TOML settings file laid over the demo defaults.")
    ] = None,
    hospitals: Annotated[int | None, typer.Option(min=1, help="Number of simulated hospitals.")] = None,
    rounds: Annotated[
        int | None, typer.Option(min=1, help="Rounds of the first stage (the static generator).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("mindfed-out"),
    seed: Annotated[int | None, typer.Option(min=0, help="Seed for cohort, partition and training.")] = None,
    cohort: Annotated[
        Path | None, typer.Option(help="Your own cohort: one data-contract sub-folder per hospital.")
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower's own logs.")] = False,
    resume: Annotated[
        bool, typer.Option(help="Go on from OUT/checkpoint after the last completed round (same settings).")
    ] = False,
    release_on_fail: Annotated[
        bool, typer.Option(help="Write bundle/ and synthetic/ even if the privacy audit fails.")
    ] = False,
) -> None:
    """Run a federation through Flower's simulation engine (default: the embedded demo cohort)."""
    _setup_logging(verbose)
    from simulation.runner import simulate as run_simulation

    overrides = {
        key: value
        for key, value in {
            "federation.hospitals": hospitals,
            "stages.0.rounds": rounds,
            "federation.seed": seed,
            "audit.release_on_fail": True if release_on_fail else None,
        }.items()
        if value is not None
    }
    with _user_errors():
        outcome = run_simulation(
            config=config, overrides=overrides, out_dir=out, cohort_dir=cohort, resume=resume
        )
    final = outcome.metrics["final"]
    console.print(f"[bold green]done[/]: results in {outcome.out_dir}")
    _print_demo_utility(outcome.metrics.get("demo_check", {}))
    _print_risk_models(outcome.metrics.get("demo_check", {}).get("risk", []))
    _print_hospital_evaluation(outcome.metrics.get("risk_evaluation") or {})
    console.print(
        f"  column-shape score vs DP reference histograms: {final['column_shape_vs_dp_reference']:.4f}"
    )
    if outcome.column_shape_vs_real is not None:
        console.print(f"  column-shape score vs the full demo cohort:    {outcome.column_shape_vs_real:.4f}")
    for hospital in outcome.metrics["hospitals"]:
        console.print(
            f"  {hospital['hospital']}: epsilon {hospital['epsilon']:.3f} of {hospital['max_epsilon']:g} "
            f"(delta {hospital['delta']:g}), {hospital['rounds_trained']} rounds"
        )
    _print_sequence_and_audit(outcome.metrics)
    _print_timings(outcome.metrics.get("timings") or {})
    release = outcome.out_dir / outcome.metrics.get("release", {}).get("folder", "")
    console.print(f"  bundle: {release / 'bundle'}   synthetic: {release / 'synthetic'}")
    console.print(f"  report: {outcome.out_dir / 'report.html'}")


def _print_demo_utility(check: dict) -> None:
    """The synthetic table against the real demo cohort: SDMetrics quality and TSTR."""
    if check.get("skipped"):
        console.print(f"  no demo check: {check['skipped']}")
    quality, utility = check.get("quality"), check.get("train_synthetic_test_real")
    if quality:
        console.print(
            f"  SDMetrics vs the demo cohort: column shapes {quality['column_shapes']:.4f}, pair trends "
            f"{quality['column_pair_trends']:.4f}, overall {quality['overall']:.4f}"
        )
    if utility:
        syn, real = utility["synthetic"], utility["real"]
        console.print(
            f"  train on synthetic, test on real: AUROC {syn['auroc']:.4f} (real {real['auroc']:.4f}), "
            f"macro-F1 {syn['macro_f1']:.4f}, high-risk F1 {syn['high_risk_f1']:.4f}"
        )


def _print_risk_models(rows: list[dict]) -> None:
    """Each exported risk model on fresh real demo patients, beside its ceiling (no DP)."""
    for row in rows:
        console.print(
            f"  risk {row['model']} ({row['route']}): AUROC {row['auroc']:.3f}, macro-F1 "
            f"{row['macro_f1']:.3f}, high-risk F1 {row['high_risk_f1']:.3f}, Brier {row['brier']:.3f}"
        )


def _print_hospital_evaluation(evaluation: dict) -> None:
    """Each risk model as the hospitals scored it on their held-out patients (DP tables, pooled)."""
    for row in evaluation.get("rows", []):
        if row["hospital"] == "all hospitals":
            console.print(
                f"  at the hospitals (DP) {row['model']} ({row['route']}): high-risk AUROC "
                f"{row['high_risk_auroc']:.3f}, macro-F1 {row['macro_f1']:.3f}, "
                f"noise sd {row['noise_sd']:.1f}"
            )


def _print_timings(timings: dict) -> None:
    """Per stage: rounds, wall time, and who spent it (server step, slowest hospital, framework)."""
    for stage, t in timings.items():
        console.print(
            f"  {stage}: {t['rounds']:.0f} rounds in {t['seconds']:.1f} s: hospitals' training "
            f"{t['hospitals_share']:.0%}, server {t['server_share']:.0%}, "
            f"framework {t['framework_share']:.0%}"
        )


def _print_sequence_and_audit(metrics: dict) -> None:
    merged = metrics.get("demo_check", {}).get("sequence", {})
    if merged:
        console.print(
            f"  weeks vs the demo cohort: KS mean {merged['ks-mean']:.4f}, discriminative "
            f"{merged['discriminative']:.4f}, predictive MAE {merged['predictive-mae']:.4f}, "
            f"max link gap {merged.get('link-max-diff', float('nan')):.4f}"
        )
    audit = metrics.get("audit")
    if audit:
        failed = [g["name"] for g in audit["gates"] if not g["passed"]]
        verdict = "[bold green]PASS[/]" if audit["passed"] else f"[bold red]FAIL[/] ({', '.join(failed)})"
        cost = max(audit.get("epsilon", {}).values(), default=0.0)
        console.print(f"  privacy audit: {verdict} (its own cost: epsilon {cost:.3f} at most per hospital)")
        if metrics.get("release", {}).get("quarantined"):
            console.print("  [bold red]the release is quarantined[/]: see quarantine/ and report.html")


@app.command()
def generate(
    model: Annotated[Path, typer.Option(help="Exported model bundle folder.")],
    n: Annotated[int, typer.Option("-n", min=1, help="Number of synthetic patients.")] = 10_000,
    out: Annotated[Path, typer.Option(help="Output CSV of static profiles.")] = Path("synthetic.csv"),
    timeseries_out: Annotated[
        Path | None, typer.Option(help="Output CSV of the linked weeks (default: <out>_timeseries.csv).")
    ] = None,
    seed: Annotated[int, typer.Option(min=0)] = 0,
    label_share: Annotated[
        list[str] | None,
        typer.Option(help="CLASS=SHARE of the label, e.g. high=0.5 (repeatable; models that support it)."),
    ] = None,
) -> None:
    """Sample synthetic patients offline from an exported bundle (no federation needed)."""
    _setup_logging(False)
    from models.bundle import load_linked_bundle, sample_linked
    from models.encoder import EncoderError
    from privacy.storage import atomic_write_with

    with _user_errors(EncoderError):
        table, sequence, card = load_linked_bundle(model)
        shares = _label_shares(label_share or [])
        static, weeks = sample_linked(table, sequence, n, seed=seed, label_shares=shares)
    atomic_write_with(out, lambda tmp: static.to_csv(tmp, index=False))
    console.print(f"wrote {len(static)} synthetic patients from {card['name']} to {out}")
    if weeks is not None:
        weeks_path = timeseries_out or out.with_name(f"{out.stem}_timeseries.csv")
        atomic_write_with(weeks_path, lambda tmp: weeks.to_csv(tmp, index=False))
        console.print(f"wrote their linked weeks ({len(weeks)} daily rows) to {weeks_path}")


def _label_shares(items: list[str]) -> dict[str, float] | None:
    """CLASS=SHARE items as a dict (None when there are none); a malformed item is named."""
    shares = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            shares[name] = float(value) if sep and name else float("nan")
        except ValueError:
            shares[name] = float("nan")
        if not 0 < shares[name] < 1:
            _fail(f"--label-share {item!r}: give CLASS=SHARE with a share between 0 and 1")
    return shares or None


@app.command()
def cohort(
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("mindfed-cohort"),
    patients: Annotated[int, typer.Option(min=10)] = 4000,
    hospitals: Annotated[int, typer.Option(min=1)] = 3,
    seed: Annotated[int, typer.Option(min=0)] = 7,
    partition: Annotated[str, typer.Option(help="iid or non-iid")] = "non-iid",
) -> None:
    """Write the embedded demo cohort, one data-contract folder per hospital."""
    _setup_logging(False)
    from configs.settings import load_settings
    from simulation.runner import prepare_demo_cohort

    overrides = {
        "federation.patients": patients,
        "federation.hospitals": hospitals,
        "federation.seed": seed,
        "federation.partition": partition,
    }
    with _user_errors():
        prepare_demo_cohort(load_settings(None, overrides), out)
    console.print(f"wrote {patients} patients in {hospitals} hospital folders under {out}")


@app.command()
def audit(
    run: Annotated[Path, typer.Option(help="Output folder of a finished run (mindfed simulate --out).")],
    max_attack_auc: Annotated[
        float | None, typer.Option(help="Gate: every attack's AUC at most this.")
    ] = None,
    max_attack_auc_ci_high: Annotated[
        float | None, typer.Option(help="Gate: AUC 95% CI upper bound.")
    ] = None,
    max_tpr_at_1pct_fpr: Annotated[
        float | None, typer.Option(help="Gate: TPR at 1% FPR at most this.")
    ] = None,
    min_dcr_protection: Annotated[
        float | None, typer.Option(help="Gate: DCR protection at least this.")
    ] = None,
) -> None:
    """Write report.html and report.json for a finished run, optionally with other gate thresholds."""
    _setup_logging(False)
    from server.audit import rerender_run_report

    thresholds = {
        "max_attack_auc": max_attack_auc,
        "max_attack_auc_ci_high": max_attack_auc_ci_high,
        "max_tpr_at_1pct_fpr": max_tpr_at_1pct_fpr,
        "min_dcr_protection": min_dcr_protection,
    }
    with _user_errors(FileNotFoundError):
        result = rerender_run_report(run, {k: v for k, v in thresholds.items() if v is not None})
    verdict = "[bold green]PASS[/]" if result.passed else "[bold red]FAIL[/]"
    console.print(f"privacy audit {verdict}: {result.html_path} and {result.json_path}")
    for gate in result.gates:
        mark = "pass" if gate.passed else "FAIL"
        console.print(
            f"  {mark}  {gate.name}: {gate.value} {gate.comparator} {gate.threshold} (worst: {gate.worst})"
        )


@app.command()
def check(
    data: Annotated[Path, typer.Option(help="A hospital's cohort folder (static.csv + timeseries.csv).")],
    schema: Annotated[
        Path | None, typer.Option(help="Cohort schema TOML (default: the shipped one).")
    ] = None,
) -> None:
    """Validate a hospital's cohort folder against the schema, as its node will; writes nothing."""
    _setup_logging(False)
    from client.data import load_cohort
    from configs.schema import DEFAULT_SCHEMA_PATH, load_schema

    with _user_errors():
        cohort_schema = load_schema(schema or DEFAULT_SCHEMA_PATH)
        cohort = load_cohort(data, cohort_schema)
    days = 0 if cohort.timeseries is None else len(cohort.timeseries)
    console.print(f"[bold green]valid[/]: {data} has {cohort.n_patients} patients and {days} daily rows")


@app.command()
def init(
    static: Annotated[Path, typer.Option("--from", help="Your static.csv: its header and value types.")],
    out: Annotated[Path, typer.Option(help="The schema draft to write (TOML).")],
    timeseries: Annotated[
        Path | None, typer.Option(help="Your timeseries.csv, for the [sequence] section.")
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing --out.")] = False,
) -> None:
    """Draft a cohort schema from your CSVs' headers and value types, ranges and categories left to fill."""
    from client.schema_init import draft_for_files
    from configs.schema_draft import DraftError
    from privacy.storage import atomic_write_text

    if out.is_dir():
        _fail(f"--out {out} is a folder; give the path of the TOML file to write")
    if out.exists() and not force:
        _fail(f"--out {out} exists; give --force to overwrite it")
    with _user_errors(DraftError):
        draft = draft_for_files(static, timeseries)
    atomic_write_text(out, draft)
    console.print(
        f"wrote a schema draft to {out}: replace every FILL ME with public knowledge, then run "
        f"mindfed check --data <folder> --schema {out}"
    )


@app.command()
def predict(
    model: Annotated[Path, typer.Option(help="An exported risk model's bundle (bundle/risk/<name>).")],
    data: Annotated[
        Path, typer.Option(help="Patients' folder (static.csv + timeseries.csv; label optional).")
    ],
    out: Annotated[Path, typer.Option(help="Output CSV: id, predicted class, p_<class> per class.")],
) -> None:
    """Risk predictions for a folder of patients from an exported risk model; writes nothing on bad input."""
    _setup_logging(False)
    from client.predict import predict_folder
    from models.encoder import EncoderError

    with _user_errors(EncoderError):
        done = predict_folder(model, data, out)
    console.print(
        f"wrote predictions for {done.patients} patients from {done.model} ({done.route}) to {done.out}"
    )


class _SpreadOptions(typer.core.TyperCommand):
    """A command whose list options take several values after one flag: `--synthetic a.csv b.csv`."""

    spread = ("--synthetic", "--names")

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, _spread_values(args, self.spread))


def _spread_values(args: list[str], flags: tuple[str, ...]) -> list[str]:
    """Repeat a spread flag before each further value it is followed by (click's repeated form)."""
    out: list[str] = []
    current: str | None = None  # the spread flag whose values are being read
    fresh = False  # that flag was just written: its first value needs no repeat
    for index, arg in enumerate(args):
        if arg == "--":
            return out + args[index:]
        if arg.startswith("-") and len(arg) > 1:
            flag = arg.split("=", 1)[0]
            current = flag if flag in flags else None
            fresh = current is not None and "=" not in arg
        elif current is not None and not fresh:
            out.append(current)
        else:
            fresh = False
        out.append(arg)
    return out


_REAL_HELP = "Real patients: a static-profile CSV or a cohort folder (static.csv [+ timeseries.csv])."
_HOLDOUT_HELP = "Real patients the generator never saw (CSV or folder): enables DCR and membership attacks."
_SCHEMA_HELP = "Cohort schema TOML (default: the shipped one)."


@app.command()
def evaluate(
    real: Annotated[Path, typer.Option(help=_REAL_HELP)],
    synthetic: Annotated[Path, typer.Option(help="Synthetic static profiles (CSV or cohort folder).")],
    out: Annotated[Path, typer.Option(help="Folder for report.html and report.json.")],
    holdout: Annotated[Path | None, typer.Option(help=_HOLDOUT_HELP)] = None,
    name: Annotated[
        str | None, typer.Option(help="The table's name in the report (default: file name).")
    ] = None,
    schema: Annotated[Path | None, typer.Option(help=_SCHEMA_HELP)] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the classifier and the attacks.")] = 0,
) -> None:
    """Score a synthetic table against real data you hold: quality, TSTR and, with --holdout, privacy."""
    _score_tables(real, [synthetic], [name] if name is not None else [], holdout, out, schema, seed)


@app.command(cls=_SpreadOptions)
def compare(
    real: Annotated[Path, typer.Option(help=_REAL_HELP)],
    synthetic: Annotated[
        list[Path], typer.Option(help="Synthetic tables, CSV or folder (several after one --synthetic).")
    ],
    out: Annotated[Path, typer.Option(help="Folder for report.html and report.json.")],
    names: Annotated[
        list[str] | None, typer.Option(help="One name per synthetic table (default: file names).")
    ] = None,
    holdout: Annotated[Path | None, typer.Option(help=_HOLDOUT_HELP)] = None,
    schema: Annotated[Path | None, typer.Option(help=_SCHEMA_HELP)] = None,
    seed: Annotated[int, typer.Option(min=0, help="Seed of the classifiers and the attacks.")] = 0,
) -> None:
    """Score several synthetic tables side by side against real data: one report.html + report.json."""
    _score_tables(real, synthetic, names or [], holdout, out, schema, seed)


def _score_tables(
    real: Path,
    synthetic: list[Path],
    names: list[str],
    holdout: Path | None,
    out: Path,
    schema: Path | None,
    seed: int,
) -> None:
    """`evaluate` and `compare`: validate every input, score, write the report, print the summary."""
    _setup_logging(False)
    from rich.progress import Progress

    from client.evaluate import EvaluationInputError, evaluate_tables, load_inputs
    from client.evaluate_report import summary_table, write_evaluation_report
    from configs.schema import DEFAULT_SCHEMA_PATH, load_schema

    if out.exists() and not out.is_dir():
        _fail(f"--out {out} is a file; give a folder for report.html and report.json")
    with _user_errors(EvaluationInputError):
        cohort_schema = load_schema(schema or DEFAULT_SCHEMA_PATH)
        real_table, tables, held = load_inputs(real, synthetic, cohort_schema, names=names, holdout=holdout)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("scoring", total=len(tables))
        evaluation = evaluate_tables(
            real_table,
            tables,
            cohort_schema,
            holdout=held,
            seed=seed,
            progress=lambda done: progress.update(task, advance=1, description=f"scored {done}"),
        )
    with _user_errors():
        written = write_evaluation_report(evaluation, cohort_schema, out)
    console.print(summary_table(evaluation))
    console.print(f"report: {written.html_path} and {written.json_path}")


@certs_app.command("init")
def certs_init(
    out: Annotated[Path, typer.Option(help="Folder for ca.* and server.* files.")],
    host: Annotated[list[str], typer.Option(help="SuperLink host name or IP (repeatable).")],
    force: Annotated[bool, typer.Option(help="Overwrite existing files.")] = False,
    days: Annotated[int, typer.Option(min=1)] = 365,
) -> None:
    """Create a CA and a SuperLink TLS certificate whose SANs are the given hosts."""
    from privacy.certs import init_ca_and_superlink

    with _user_errors(ValueError):
        paths = init_ca_and_superlink(out, host, force=force, days=days)
    console.print(f"CA: {paths.ca_crt}  SuperLink: {paths.server_crt} (key {paths.server_key}, mode 600)")


@certs_app.command("node")
def certs_node(
    name: Annotated[str, typer.Option(help="Hospital name (letters, digits, - and _).")],
    out: Annotated[Path, typer.Option(help="Folder for <name>.key and <name>.pub.")],
    force: Annotated[bool, typer.Option(help="Overwrite existing files.")] = False,
) -> None:
    """Create a hospital's SuperNode authentication key pair (ECDSA P-384, OpenSSH format)."""
    from privacy.certs import create_node_keys

    with _user_errors(ValueError):
        paths = create_node_keys(name, out, force=force)
    console.print(f"node key: {paths.private_key} (mode 600), public key to register: {paths.public_key}")
