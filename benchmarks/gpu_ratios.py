"""bf16-vs-fp32 and CUDA-vs-CPU: one DP-SGD local round per neural model and phase, timed side by side.

Run by `benchmarks/gpu.sh` (one command on a lent GPU machine); without CUDA it times the CPU only
and says so. Every setting trains the same model from the same weights on the same patients
(one demo hospital by default) for the same number of DP-SGD steps, after an untimed warm-up round
on a few batches (CUDA kernels, cuDNN plans, the caching allocator). CUDA timings are bracketed by
torch.cuda.synchronize(); "bf16" is each model's own path (`models.runtime.autocast_for`), "fp32"
the same code inside `models.runtime.full_precision()`.

    python -m benchmarks.gpu_ratios [--quick] [--patients N] [--repeats R] [--models a,b] [--out PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn

from configs.settings import load_settings
from models.base import LocalData, LocalRound
from models.encoder import TabularEncoder
from models.registry import get_model_class, registered_models
from models.runtime import full_precision
from privacy.ledger import PrivacyLedger
from tests.support.round_models import demo_data, dp_round_plans, tiny_params, why_not_a_round_model

OUT = Path(__file__).with_name("gpu_results.json")
CPU, CUDA_FP32, CUDA_BF16 = "cpu", "cuda-fp32", "cuda-bf16"
WARM_UP_BATCHES = 4
NO_CUDA = "no CUDA"


@dataclass
class Timing:
    """One model phase in one setting: median seconds of a local round, peak CUDA memory, steps."""

    seconds: float | None = None
    peak_mib: float | None = None
    steps: int = 0
    # "k/n": forward passes of layers with weights whose output was bf16, of all (in the warm-up)
    bf16_layers: str = ""
    error: str = ""


@dataclass
class Row:
    """A model phase's timings by setting and the ratios the issue asks for."""

    model: str
    phase: str
    params: dict[str, Any]
    timings: dict[str, Timing] = field(default_factory=dict)

    def ratio(self, slow: str, fast: str) -> float | None:
        """seconds(slow) / seconds(fast): above 1 when `fast` is faster."""
        a, b = self.timings.get(slow), self.timings.get(fast)
        if a is None or b is None or not a.seconds or not b.seconds:
            return None
        return a.seconds / b.seconds


@dataclass(frozen=True)
class Job:
    """What every setting of one model phase shares: the model, its first weights and the patients."""

    name: str
    phase_index: int
    params: dict[str, Any]
    encoder: TabularEncoder
    state: dict[str, torch.Tensor]
    data: LocalData
    warm_up: LocalData
    batch_size: int


def _first_rows(data: LocalData, n: int) -> LocalData:
    return LocalData(profiles=data.profiles[:n], weeks=None if data.weeks is None else data.weeks[:n])


@contextlib.contextmanager
def _precision(setting: str) -> Iterator[None]:
    with full_precision() if setting == CUDA_FP32 else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def _layer_dtypes() -> Iterator[Counter[str]]:
    """Counts every forward pass of a layer with its own weights by its output's dtype."""
    counts: Counter[str] = Counter()

    def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
        if next(module.parameters(recurse=False), None) is None:
            return
        first = output[0] if isinstance(output, tuple) else output
        if isinstance(first, torch.Tensor):
            counts["bf16" if first.dtype == torch.bfloat16 else "other"] += 1

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        yield counts
    finally:
        handle.remove()


def timed_round(
    job: Job, device: torch.device, data: LocalData, *, private: bool = True
) -> tuple[float, int, Any]:
    """(seconds, steps, trained model) of one local round from the job's first weights, a fresh
    ledger; DP-SGD unless `private` is False (the same round without Opacus, for a reference)."""
    model = get_model_class(job.name)(job.encoder, job.params, seed=0)
    model.load_state_dict(job.state)
    ledger = PrivacyLedger(max_epsilon=1e6, delta=1e-5)  # fresh per round: the budget never refuses
    plan: LocalRound = dp_round_plans(
        job.name, device=device, ledger=ledger, batch_size=job.batch_size, seed=0
    )[job.phase_index]
    if not private:
        plan = replace(plan, dp=None)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    report = model.fit_round(data, plan)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, report.steps, model


def measure(job: Job, setting: str, repeats: int) -> Timing:
    """Warm-up round (untimed, layer dtypes counted), then the median of `repeats` timed rounds."""
    device = torch.device("cpu" if setting == CPU else "cuda")
    try:
        with _precision(setting):
            with _layer_dtypes() as counts:
                timed_round(job, device, job.warm_up)
            seconds, peaks, steps = [], [], 0
            for _ in range(repeats):
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                took, steps, _ = timed_round(job, device, job.data)
                seconds.append(took)
                if device.type == "cuda":
                    peaks.append(torch.cuda.max_memory_allocated() / 2**20)
    except Exception as err:  # a setting that fails is a finding for the table, not the end of the run
        return Timing(error=f"{type(err).__name__}: {err}".splitlines()[0][:160])
    return Timing(
        seconds=statistics.median(seconds),
        peak_mib=max(peaks) if peaks else None,
        steps=steps,
        bf16_layers=f"{counts['bf16']}/{counts['bf16'] + counts['other']}",
    )


def _seconds(timing: Timing | None, cuda: bool) -> str:
    if timing is None:
        return NO_CUDA if not cuda else "-"
    return "error" if timing.error else f"{timing.seconds:.3f}"


def _times(value: float | None, cuda: bool) -> str:
    return f"{value:.2f}x" if value is not None else (NO_CUDA if not cuda else "-")


def _mib(timing: Timing | None, cuda: bool) -> str:
    if timing is None or timing.peak_mib is None:
        return NO_CUDA if not cuda else "-"
    return f"{timing.peak_mib:.0f}"


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    """The results as a markdown table, with what was measured and any errors below it."""
    cuda = bool(meta["cuda"])
    lines = [
        f"GPU: {meta['gpu']} | torch {meta['torch']} (CUDA {meta['cuda_version']}) | {meta['patients']} "
        f"patients, batch {meta['batch_size']}, {meta['repeats']} timed round(s) each, "
        f"{meta['cpu_threads']} CPU thread(s){' | quick' if meta['quick'] else ''}",
        "",
        "| model | phase | steps | CPU s | CUDA fp32 s | CUDA bf16 s | fp32 / bf16 | CPU / CUDA bf16 "
        "| peak MiB fp32 | peak MiB bf16 | bf16 layers |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        t = row.timings
        bf16 = t.get(CUDA_BF16)
        steps = next((x.steps for x in t.values() if x.steps), 0)
        lines.append(
            f"| {row.model} | {row.phase or '-'} | {steps} | {_seconds(t.get(CPU), cuda)} "
            f"| {_seconds(t.get(CUDA_FP32), cuda)} | {_seconds(bf16, cuda)} "
            f"| {_times(row.ratio(CUDA_FP32, CUDA_BF16), cuda)} | {_times(row.ratio(CPU, CUDA_BF16), cuda)} "
            f"| {_mib(t.get(CUDA_FP32), cuda)} | {_mib(bf16, cuda)} "
            f"| {bf16.bf16_layers if bf16 and not bf16.error else (NO_CUDA if not cuda else '-')} |"
        )
    lines += [
        "",
        "Ratios above 1: the second setting is faster. bf16 layers: forward passes of layers with weights "
        "whose output was bf16 (0/n: the model has no bf16 path).",
    ]
    lines += [
        f"- error in {row.model} {row.phase or '-'} {setting}: {timing.error}"
        for row in rows
        for setting, timing in row.timings.items()
        if timing.error
    ]
    return "\n".join(lines)


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    run = load_settings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny networks, few patients, one timed round")
    parser.add_argument("--patients", type=int, help="default: one demo hospital (quick: 256)")
    parser.add_argument("--batch-size", type=int, default=run.federation.batch_size)
    parser.add_argument(
        "--repeats", type=int, help="timed rounds per setting, median kept (default 3, quick 1)"
    )
    parser.add_argument("--cpu-threads", type=int, default=run.runtime.threads_per_client)
    parser.add_argument("--models", help="comma-separated subset of the round models")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.patients is None:
        args.patients = 256 if args.quick else run.federation.patients // run.federation.hospitals
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    args.model_params = {name: run.model.params_for(name) for name in registered_models()}
    return args


def _jobs(args: argparse.Namespace, encoder: TabularEncoder, data: LocalData) -> Iterator[Job]:
    params = {n: tiny_params(n) if args.quick else args.model_params[n] for n in args.model_params}
    models = args.models.split(",") if args.models else None
    yield from round_jobs(encoder, data, params=params, batch_size=args.batch_size, models=models)


def round_jobs(
    encoder: TabularEncoder,
    data: LocalData,
    *,
    params: dict[str, dict[str, Any]],
    batch_size: int,
    models: list[str] | None = None,
) -> Iterator[Job]:
    """One job per phase of every round model (or of `models`), each from the same first weights."""
    names = [n for n in registered_models() if not why_not_a_round_model(n)]
    if models:
        if unknown := set(models) - set(names):
            raise SystemExit(f"not round models: {sorted(unknown)}; choose from {names}")
        names = [n for n in names if n in models]
    warm_up = _first_rows(data, WARM_UP_BATCHES * batch_size)
    for name in names:
        state = get_model_class(name)(encoder, params[name], seed=0).state_dict()
        for index in range(len(get_model_class(name).phases) or 1):
            yield Job(name, index, params[name], encoder, state, data, warm_up, batch_size)


def main(argv: list[str] | None = None) -> int:
    """Time every round model's phases in every setting; write the JSON, print the table."""
    args = _arguments(argv)
    # Opacus warns about its RNG and hooks on every round; the timings are what matters here.
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.cpu_threads)  # a simulated client's threads, also for the CPU baseline
    cuda = torch.cuda.is_available()
    settings = [CPU, *((CUDA_FP32, CUDA_BF16) if cuda else ())]
    encoder, data = demo_data(args.patients, seed=args.seed)
    rows: list[Row] = []
    for job in _jobs(args, encoder, data):
        phase = (get_model_class(job.name).phases or ("",))[job.phase_index]
        row = Row(job.name, phase, job.params)
        for setting in settings:
            row.timings[setting] = timing = measure(job, setting, args.repeats)
            print(
                f"{job.name} {phase or '-'} {setting}: {timing.error or f'{timing.seconds:.3f} s'}",
                file=sys.stderr,
            )
        rows.append(row)
    meta = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cuda": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else NO_CUDA,
        "torch": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python": platform.python_version(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "quick": args.quick,
        "patients": args.patients,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "cpu_threads": args.cpu_threads,
    }
    results = {
        "meta": meta,
        "rows": [
            {
                **asdict(row),
                "fp32_over_bf16": row.ratio(CUDA_FP32, CUDA_BF16),
                "cpu_over_cuda_bf16": row.ratio(CPU, CUDA_BF16),
            }
            for row in rows
        ],
    }
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    print(markdown(rows, meta))
    print(f"\nwritten: {args.out}")
    return 1 if any(t.error for row in rows for t in row.timings.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
