"""A run's predicted time and peak memory per stage, extrapolated from measured unit costs.

Pure arithmetic: every function takes what a short calibration measured (seconds per SGD
step, per realgrad batch, per coordinator iteration, per evaluation epoch, and the peak
memory of the process that did it) and the counts a config implies, and returns a
:class:`StagePrediction`. ``ead_dist/calibrate.py`` measures; ``ead-dist plan`` prints.

Memory is per process (an expert actor, a realgrad worker, the coordinator, an evaluation
run): the calibration's measured peak plus what grows with the data or the run and was not
held during calibration (the loaded split, the realgrad sums of a whole chunk, the bank of
real terms). ``processes`` of them run at once on this machine, so the machine needs
``machine_mb``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

from .progress import format_duration

MIB = 1024**2

# Loading a split (ead_dist.data.arrays.load_split) holds, per pixel value, the stacked uint8
# tensor (1 byte) while normalise builds x / 255 (4), x - mean (4) and (x - mean) / std (4):
# 13 bytes at its peak, 4 kept afterwards.
LOAD_PEAK_BYTES_PER_VALUE = 13
FLOAT_BYTES = 4


class InsufficientMemoryError(RuntimeError):
    """A stage's predicted memory exceeds what this machine has available."""


@dataclass
class StagePrediction:
    stage: str
    seconds: Optional[float]  # wall time on this machine; None: not predicted
    peak_mb: Optional[float]  # per process (one worker on a cluster)
    processes: int  # how many such processes run at once on this machine
    basis: str  # what it was extrapolated from

    @property
    def machine_mb(self) -> Optional[float]:
        return None if self.peak_mb is None else self.peak_mb * self.processes

    def to_dict(self) -> dict:
        return dict(asdict(self), machine_mb=self.machine_mb)


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """As ``ead_dist.trajectory.steps_per_epoch``: the ragged last batch is dropped."""
    return max(1, num_samples // batch_size)


def waves(jobs: int, concurrent: int) -> int:
    """Rounds of ``concurrent`` parallel jobs needed for ``jobs`` equal jobs."""
    return math.ceil(jobs / max(1, concurrent)) if jobs else 0


def load_peak_bytes(samples: int, values_per_sample: int) -> int:
    return LOAD_PEAK_BYTES_PER_VALUE * samples * values_per_sample


def ingest_prediction(*, done: bool, sample_seconds: float = 0.0, samples: int = 0,
                      values_per_sample: int = 0, peak_mb: float = 0.0,
                      concurrent: int = 1) -> StagePrediction:
    """Shards written in parallel tasks; the driver holds the raw uint8 split meanwhile."""
    if done:
        return StagePrediction("ingest", 0.0, None, 0, "DATA/meta.json exists: skipped")
    seconds = samples * sample_seconds / max(1, concurrent)
    peak = peak_mb + samples * values_per_sample / MIB
    return StagePrediction("ingest", seconds, peak, 1,
                           f"{samples} samples x {sample_seconds * 1e3:.3f} ms (shard write) / "
                           f"{concurrent} tasks; raw file reading not included")


def expert_steps(epochs: int, train_samples: int, batch_size: int) -> int:
    """SGD steps of one expert: epochs x floor(train / batch)."""
    return epochs * steps_per_epoch(train_samples, batch_size)


def expert_checkpoints(epochs: int, train_samples: int, batch_size: int, save_every: int) -> int:
    """Checkpoints one expert records: theta_0, every save_every-th step and the last."""
    steps = expert_steps(epochs, train_samples, batch_size)
    return 1 + steps // save_every + (1 if steps % save_every else 0)


def experts_prediction(*, step_seconds: float, checkpoint_seconds: float,
                       train_load_seconds: float, test_load_seconds: float, peak_mb: float,
                       count: int, epochs: int, train_samples: int, loaded_train: int,
                       test_samples: int, batch_size: int, save_every: int,
                       values_per_sample: int, concurrent: int) -> StagePrediction:
    """count experts in waves of ``concurrent`` processes (actors, or this process without
    Ray). Each process loads D once (``loaded_train`` samples, all of D even when an expert
    trains on a subset; ``train_load_seconds``, the processes at once) and keeps it for every
    expert it trains; each expert runs epochs x floor(train / batch) steps, records its
    checkpoints and at the end reads the test split (``test_load_seconds``)."""
    steps = expert_steps(epochs, train_samples, batch_size)
    checkpoints = expert_checkpoints(epochs, train_samples, batch_size, save_every)
    one = steps * step_seconds + checkpoints * checkpoint_seconds + test_load_seconds
    seconds = train_load_seconds + waves(count, concurrent) * one
    # The train split stays loaded while the test split is loaded at the end.
    data = max(load_peak_bytes(loaded_train, values_per_sample),
               FLOAT_BYTES * loaded_train * values_per_sample
               + load_peak_bytes(test_samples, values_per_sample))
    return StagePrediction(
        "experts", seconds, peak_mb + data / MIB, min(count, max(1, concurrent)),
        f"{count} experts x {steps} steps x {step_seconds * 1e3:.1f} ms + {checkpoints} "
        f"checkpoints, {waves(count, concurrent)} wave(s) of {concurrent}; + the loaded split")


def realgrad_batches(selected_samples: int, workers: int, batch_size: int) -> int:
    """Forward/backward chunks one worker runs per checkpoint: ceil(samples / W / batch)."""
    return math.ceil(math.ceil(selected_samples / workers) / batch_size)


def realgrad_passes(checkpoints: int, chunk: Optional[int]) -> int:
    return math.ceil(checkpoints / (chunk or checkpoints))


def realgrad_prediction(*, batch_seconds: float, load_sample_seconds: float, peak_mb: float,
                        sums_mb_chunk: float, checkpoints: int, chunk: Optional[int],
                        selected_samples: int, workers: int, batch_size: int
                        ) -> StagePrediction:
    """Each of W workers runs, for every checkpoint, ceil(selected / W / batch) batches (two
    grouped gradient sums each, as ``partial_sums`` does) and decodes its selected samples
    once per pass. Memory: the calibration held one checkpoint's sums; a pass holds
    ``chunk`` checkpoints' (``sums_bytes``) and rank 0 forms one checkpoint's means."""
    batches = realgrad_batches(selected_samples, workers, batch_size)
    passes = realgrad_passes(checkpoints, chunk)
    seconds = (checkpoints * batches * batch_seconds
               + passes * math.ceil(selected_samples / workers) * load_sample_seconds)
    return StagePrediction(
        "realgrad", seconds, peak_mb + sums_mb_chunk, workers,
        f"{checkpoints} checkpoints x {batches} batches/worker x {batch_seconds * 1e3:.1f} ms, "
        f"{passes} pass(es), {workers} worker(s); + sums of {chunk or checkpoints} checkpoints; "
        "Ray Train start-up per pass not included")


def real_terms_bytes(parameters: int, num_classes: int, p_batches: int,
                     class_terms: bool) -> int:
    """What the coordinator holds per checkpoint in float32 (``load_real_terms``): theta_t,
    g_D, g_P [K, n] and, with class terms, g_D_classes [C, n] and g_P_classes [K, C, n]."""
    rows = 2 + p_batches + (num_classes + p_batches * num_classes if class_terms else 0)
    return FLOAT_BYTES * parameters * rows


def distill_prediction(*, iteration_seconds: float, peak_mb: float, iterations: int,
                       held_mb: float, held_what: str) -> StagePrediction:
    """The coordinator: iterations x seconds per iteration, one process. ``held_mb``: the
    real terms (or expert segments) beyond the one the calibration held."""
    return StagePrediction(
        "distill", iterations * iteration_seconds, peak_mb + held_mb, 1,
        f"{iterations} iterations x {iteration_seconds * 1e3:.1f} ms; + {held_what}")


def evaluate_prediction(*, epoch_seconds: dict[str, float], test_seconds: dict[str, float],
                        peak_mb: float, sets: int, runs: int, epochs: int,
                        test_samples: int, values_per_sample: int,
                        concurrent: int) -> StagePrediction:
    """sets x models x runs jobs, each epochs x seconds per epoch plus one pass over the test
    split, spread over ``concurrent`` processes. Memory: the test split, held as float32."""
    jobs = [epochs * epoch_seconds[m] + test_seconds[m] for m in epoch_seconds
            for _ in range(sets * runs)]
    count = len(jobs)
    seconds = max(sum(jobs) / max(1, min(concurrent, count)), max(jobs)) if jobs else 0.0
    data = FLOAT_BYTES * test_samples * values_per_sample
    per_epoch = ", ".join(f"{m} {s * 1e3:.1f} ms" for m, s in epoch_seconds.items())
    return StagePrediction(
        "evaluate", seconds, peak_mb + data / MIB, min(count, max(1, concurrent)),
        f"{sets} sets x {len(epoch_seconds)} models x {runs} runs x {epochs} epochs "
        f"({per_epoch} per epoch) / {concurrent}; + the test split")


def over_budget(predictions: list[StagePrediction], available_mb: float
                ) -> Optional[StagePrediction]:
    """The first stage whose machine-wide peak exceeds ``available_mb``, or None."""
    for prediction in predictions:
        if prediction.machine_mb is not None and prediction.machine_mb > available_mb:
            return prediction
    return None


def check_memory(predictions: list[StagePrediction], available_mb: float) -> None:
    """Raise InsufficientMemoryError naming the first stage that would not fit."""
    stage = over_budget(predictions, available_mb)
    if stage is not None:
        raise InsufficientMemoryError(
            f"stage {stage.stage} is predicted to need {stage.machine_mb:.0f} MiB "
            f"({stage.processes} x {stage.peak_mb:.0f} MiB) but this machine has "
            f"{available_mb:.0f} MiB available; lower its settings (ead-dist plan shows them) "
            "or run it on a larger machine")


def _duration(seconds: Optional[float]) -> str:
    return "-" if seconds is None else format_duration(seconds, digits=1)


def format_table(predictions: list[StagePrediction], available_mb: Optional[float] = None
                 ) -> str:
    """The plan as a plain-text table, one row per stage, with the total time."""
    rows = [("stage", "time", "peak MiB/process", "processes", "machine MiB", "from")]
    for p in predictions:
        rows.append((p.stage, _duration(p.seconds),
                     "-" if p.peak_mb is None else f"{p.peak_mb:.0f}", str(p.processes),
                     "-" if p.machine_mb is None else f"{p.machine_mb:.0f}", p.basis))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[5]
             for row in rows]
    total = sum(p.seconds for p in predictions if p.seconds is not None)
    lines.append(f"total {_duration(total)}" + (
        f"; {available_mb:.0f} MiB available on this machine" if available_mb else ""))
    return "\n".join(lines)
