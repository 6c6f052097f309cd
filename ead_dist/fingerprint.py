"""Stage fingerprints: the settings that made a stage's outputs, recorded when the stage starts.

Every stage skips or resumes work it finds on storage. So that it never hands back work made
under other settings, each stage records ``fingerprint.json`` (``RUN/experts/``,
``RUN/realgrad/``, ``RUN/distill/``, ``RUN/evaluate/``; ingest in ``DATA/``) before it writes
anything, and a later start compares. A fingerprint holds the dotted config fields that
determine the stage's output, together with those of the stages it reads, so a change
upstream invalidates everything downstream. Settings that change only speed or placement
(workers, threads, chunk sizes, ``ray.*``, ``storage.*``, where the data lives) are left out,
so a run resumes under a different machine shape. The data are identified by their content
(``data.content``, a digest of ``meta.json``'s description of them), not by their URL.

:func:`stage_fields` is the pure part; :func:`guard` and :func:`guard_ingest` do the I/O.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Optional

from . import storage
from .alignment import REAL_TERM_OBJECTIVES
from .config import ConfigError, RunConfig

log = logging.getLogger(__name__)

STAGES = ("ingest", "experts", "realgrad", "distill", "evaluate")
FINGERPRINT_NAME = "fingerprint.json"
# What each stage writes under RUN: deleting these (and every later stage's) starts it afresh.
STAGE_OUTPUTS = {"experts": ("experts",), "realgrad": ("realgrad",),
                 "distill": ("distill", "synthetic.safetensors"),
                 "evaluate": ("evaluate", "eval.json")}
# Fields of the stages' own sections that do not change what the stage computes.
NOT_RESULTS = (
    "realgrad.workers",  # the sums are all-reduced: the same for any W
    "realgrad.batch_size",  # forward/backward chunking of the same sums
    "realgrad.chunk",  # how many checkpoints share a pass over the shards: the same sums
    "distill.save_every",  # resume points only
    "distill.threads",
    "distill.unroll",  # full and recompute give the same set up to rounding
    "evaluate.baselines",  # which extra sets eval.json covers; checked against it on reuse
    "weights.batch_size",  # embedding chunk
)
# What a rerun may change after the coordinator diverged, and still resume from the state saved
# before the failing step: the step sizes the divergence error advises lowering.
STEP_SIZE_FIELDS = ("distill.lr_images", "distill.lr_labels", "distill.lr_student_lr",
                    "distill.baseline_lr_images")


# The stages whose output each image_text field determines (max_broken_samples only stops a run).
IMAGE_TEXT_STAGES = {
    "image_text.model": ("experts", "realgrad", "distill", "evaluate"),
    "image_text.pretrained": ("experts", "realgrad", "distill", "evaluate"),
    "image_text.context_length": ("experts", "realgrad", "distill", "evaluate"),
    "image_text.held_out": ("experts", "realgrad", "distill", "evaluate"),
    "image_text.train_pairs": ("experts", "realgrad", "distill", "evaluate"),
    "image_text.max_broken_samples": (),
    "image_text.expert_data": ("experts", "realgrad", "distill", "evaluate"),
    "image_text.stream_buffer": ("experts", "realgrad", "distill", "evaluate"),
    "image_text.test_pairs": ("evaluate",),
    "image_text.pairs": ("distill", "evaluate"),
    "image_text.learn_captions": ("distill", "evaluate"),
    "image_text.lr_text": ("distill", "evaluate"),
    "image_text.similarity": ("distill", "evaluate"),
    "image_text.similarity_rank": ("distill", "evaluate"),
    "image_text.lr_similarity": ("distill", "evaluate"),
    "image_text.augmentation": ("experts", "realgrad", "distill", "evaluate"),
}


class StaleRunError(ConfigError):
    """A stage's recorded settings differ from this config's; names the fields and the way out."""


def ingest_fields(dataset: str, image_size: Optional[int] = None,
                  attributes: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """What determines ``DATA``: the dataset, for image-text data the image size, and the
    dataset's own attributes (Colored Fashion-MNIST's conflict ratio and seed)."""
    fields: dict[str, Any] = {"data.dataset": dataset}
    if image_size is not None:
        fields["data.image_size"] = image_size
    fields.update({f"data.{key}": value for key, value in (attributes or {}).items()})
    return fields


def data_content(meta) -> str:
    """A digest of what ``meta.json`` says the data are (not where they are or how sharded)."""
    described = {"name": meta.name, "task": meta.task, "image_shape": meta.image_shape,
                 "mean": meta.mean, "std": meta.std, "classes": meta.classes,
                 "sizes": {split: info.size for split, info in sorted(meta.splits.items())}}
    if meta.attributes:  # absent before attributes existed: older digests stay as they were
        described["attributes"] = meta.attributes
    encoded = json.dumps(described, sort_keys=True).encode()
    return "sha256:" + hashlib.sha256(encoded).hexdigest()[:16]


def _section(config: RunConfig, name: str) -> dict[str, Any]:
    section = getattr(config, name)
    return {f"{name}.{field}": getattr(section, field) for field in type(section).model_fields
            if f"{name}.{field}" not in NOT_RESULTS}


def weights_fields(config: RunConfig) -> dict[str, Any]:
    """The per-sample weight settings: the method always (so that switching it off is seen),
    the rest only when weights are on (they change nothing otherwise)."""
    if config.weights.method == "none":
        return {"weights.method": "none"}
    return _section(config, "weights")


def uses_weights(config: RunConfig, stage: str) -> bool:
    """Whether ``stage``'s output depends on the weights: realgrad's terms are weighted means,
    and so are DM's real class means and DC's real losses; distill and evaluate inherit
    realgrad's."""
    if stage == "realgrad":
        return True
    return stage in ("distill", "evaluate") and (reads_real_terms(config)
                                                  or config.distill.method in ("dm", "dc"))


def reads_real_terms(config: RunConfig) -> bool:
    return config.distill.method == "ead" and config.distill.objective in REAL_TERM_OBJECTIVES


def caches_dm_means(config: RunConfig) -> bool:
    """Whether realgrad computes DM's real class means (ead_dist/stages/dm_real.py)."""
    return config.distill.method == "dm" and config.distill.dm_real == "realgrad"


def resamples_real_batches(config: RunConfig) -> bool:
    """Whether DM's or DC's real batches are drawn in proportion to the weights (and averaged
    plainly) rather than drawn uniformly and averaged with the weights."""
    return config.weights.method != "none" and config.distill.weighted_batches == "resample"


def reads_realgrad(config: RunConfig) -> bool:
    """Whether the distill stage reads what realgrad published."""
    return reads_real_terms(config) or caches_dm_means(config)


# The DM settings that fix every iteration's draws, hence the means realgrad caches for DM.
DM_MEANS_FIELDS = ("distill.method", "distill.dm_real", "distill.iterations", "distill.seed",
                   "distill.real_batch_size", "distill.weighted_batches")


def inputs(config: RunConfig, stage: str) -> tuple[str, ...]:
    """The earlier stages whose outputs ``stage`` reads, directly or through another stage."""
    earlier = {"ingest": (), "experts": ("ingest",), "realgrad": ("ingest", "experts"),
               "distill": ("ingest", "experts") + (("realgrad",) if reads_realgrad(config)
                                                    else ()),
               "evaluate": ("ingest", "experts") + (("realgrad",) if reads_realgrad(config)
                                                     else ()) + ("distill",)}
    return earlier[stage]


def stage_fields(config: RunConfig, stage: str, content: Optional[str] = None) -> dict[str, Any]:
    """The settings that determine ``stage``'s output, its inputs' included, as dotted fields.

    ``content`` is :func:`data_content` of the dataset (every stage after ingest needs it).
    """
    image_text = config.data.dataset == "cc3m"
    fields = ingest_fields(config.data.dataset, config.data.image_size if image_text else None)
    if stage == "ingest":
        return _json_values(fields)
    if content is None:
        raise ValueError(f"the {stage} fingerprint needs the data's content digest")
    fields["data.content"] = content
    if stage == "evaluate":  # its ConvNet takes the model section's options whatever model.name
        fields.update(_section(config, "model"))
    else:
        fields["model.name"] = config.model.name
        fields.update({f"model.{k}": v
                       for k, v in config.model.options_for(config.model.name).items()})
    fields.update(_section(config, "experts"))
    if stage == "realgrad" or (stage in ("distill", "evaluate") and reads_realgrad(config)):
        fields.update(_section(config, "realgrad"))
        if image_text:  # pair terms are batch means (p_batch_size, real_samples // it): no classes
            fields.pop("realgrad.class_terms")
    if stage == "realgrad" and caches_dm_means(config):
        fields.update({name: value for name, value in _section(config, "distill").items()
                       if name in DM_MEANS_FIELDS})
    if uses_weights(config, stage):
        fields.update(weights_fields(config))
    if stage in ("distill", "evaluate"):
        fields.update(_section(config, "distill"))
    if stage == "evaluate":
        fields.update(_section(config, "evaluate"))
    if image_text:
        fields.update({k: v for k, v in _section(config, "image_text").items()
                       if stage in IMAGE_TEXT_STAGES[k]})
    return _json_values(fields)


def _json_values(fields: dict[str, Any]) -> dict[str, Any]:
    """As they read back from fingerprint.json (tuples become lists), so they compare equal."""
    return json.loads(json.dumps(fields, sort_keys=True))


def _default(field: str) -> Any:
    value: Any = RunConfig()
    for part in field.split("."):
        value = getattr(value, part, None)
    return _json_values({"v": value})["v"]


def differences(recorded: dict[str, Any], current: dict[str, Any]
                ) -> list[tuple[str, Any, Any]]:
    """(field, recorded value, current value) for every field that differs.

    A field the record lacks was added to the config after it was made; it differs only when
    this config moves it from its default (which is what the old code did).
    """
    missing = object()
    found = []
    for field, value in sorted(current.items()):
        old = recorded.get(field, missing)
        if old is missing:
            old = _default(field)
        if old != value:
            found.append((field, old, value))
    return found


def describe(differing: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{field} {old!r} -> {new!r}" for field, old, new in differing)


def record_url(config: RunConfig, stage: str) -> str:
    if stage == "ingest":
        return storage.join(config.data.url, FINGERPRINT_NAME)
    return storage.join(config.run, stage, FINGERPRINT_NAME)


def _later_outputs(run_url: str, stage: str) -> list[str]:
    later = STAGES[STAGES.index(stage):]
    return [storage.join(run_url, name) for s in later for name in STAGE_OUTPUTS[s]]


def _refuse_if_different(url: str, stage: str, expected: dict[str, Any], remedy: str) -> bool:
    """Whether ``url`` holds a record; :class:`StaleRunError` when it differs from ``expected``."""
    if not storage.exists(url):
        return False
    differing = differences(storage.read_json(url).get("fields", {}), expected)
    if differing:
        raise StaleRunError(f"the {stage} stage at {url.rsplit('/', 1)[0]} was made with other "
                            f"settings: {describe(differing)}. Its outputs do not belong to "
                            f"this config; {remedy}")
    return True


def _record(url: str, stage: str, expected: dict[str, Any], outputs: list[str]) -> None:
    if any(storage.exists(output) for output in outputs):
        log.warning("the %s stage at %s has outputs but no %s (they were made before stages "
                    "recorded their settings): taking them as made with this config's",
                    stage, url.rsplit("/", 1)[0], FINGERPRINT_NAME)
    storage.publish_json(url, {"stage": stage, "fields": expected})


def _data_remedy(data_url: str) -> str:
    return f"use another data.url, or delete {data_url} and every run made from it"


def record_divergence(run_url: str, iteration: int, message: str) -> None:
    """Mark RUN/distill's fingerprint as diverged at ``iteration`` (its state saved before the
    failing step), so that one rerun with other step sizes may resume from that state."""
    url = storage.join(run_url, "distill", FINGERPRINT_NAME)
    if not storage.exists(url):  # an optimiser run outside the stage (tests, benchmarks)
        return
    record = storage.read_json(url)
    record["diverged"] = {"iteration": iteration, "error": message}
    storage.publish_json(url, record)


def _resume_after_divergence(url: str, expected: dict[str, Any]) -> bool:
    """Whether the distill record at ``url`` diverged and differs from ``expected`` in step
    sizes only; if so it now records ``expected`` (and what changed, when), so the rerun
    resumes from the state saved before the divergence."""
    if not storage.exists(url):
        return False
    record = storage.read_json(url)
    differing = differences(record.get("fields", {}), expected)
    if "diverged" not in record or not differing or \
            any(field not in STEP_SIZE_FIELDS for field, _, _ in differing):
        return False
    diverged = record.pop("diverged")
    log.warning("distill diverged at iteration %d; resuming from its saved state with %s",
                diverged["iteration"], describe(differing))
    record.setdefault("resumed_after_divergence", []).append(
        {"iteration": diverged["iteration"],
         "changed": {field: [old, new] for field, old, new in differing}})
    record["fields"] = expected
    storage.publish_json(url, record)
    return True


def _extend_iterations(run_url: str, url: str, expected: dict[str, Any]) -> bool:
    """Whether the distill record at ``url`` differs from ``expected`` only by more
    ``distill.iterations``; if so the run goes on from its newest saved state (iteration i's
    draws depend on the seed and i alone, so it makes the set an uninterrupted run of the new
    length makes).

    The shorter run's result makes way first: its set stays in ``distill/state-NNNNNN``, its
    ``eval.json`` moves to ``distill/eval-NNNNNN.json``, and the evaluation's runs go. Only then
    does the record name the new length, so a crash in between never leaves the longer run's
    record beside the shorter run's set.
    """
    if not storage.exists(url):
        return False
    record = storage.read_json(url)
    differing = differences(record.get("fields", {}), expected)
    if "diverged" in record or [field for field, _, _ in differing] != ["distill.iterations"]:
        return False
    (_, old, new), = differing
    if new < old:
        return False
    evaluation = storage.join(run_url, "eval.json")
    if storage.exists(evaluation):
        storage.publish_bytes(storage.join(run_url, "distill", f"eval-{old:06d}.json"),
                              storage.read_bytes(evaluation))
    for name in ("synthetic.safetensors", "eval.json", "evaluate"):
        storage.remove(storage.join(run_url, name))
    log.warning("distill: extending the run from %d to %d iterations; it goes on from its "
                "newest saved state", old, new)
    record.setdefault("extended", []).append({"from": old, "to": new})
    record["fields"] = expected
    storage.publish_json(url, record)
    return True


def guard(config: RunConfig, stage: str) -> None:
    """At the start of ``stage``: refuse outputs of its inputs or of its own that were made with
    other settings (:class:`StaleRunError`); record its fingerprint if it has none yet."""
    from .data.meta import read_meta

    content = data_content(read_meta(config.data.url))
    for each in inputs(config, stage) + (stage,):
        if each == "ingest":
            _refuse_if_different(record_url(config, each), each, stage_fields(config, each),
                                 _data_remedy(config.data.url))
            continue
        outputs = _later_outputs(config.run, each)
        remedy = (f"use a new run URL (--set run=...), or delete {', '.join(outputs)} (this "
                  "stage's outputs and every later stage's) and rerun")
        url, expected = record_url(config, each), stage_fields(config, each, content)
        if each == stage == "distill" and (_resume_after_divergence(url, expected)
                                            or _extend_iterations(config.run, url, expected)):
            continue
        if not _refuse_if_different(url, each, expected, remedy) and each == stage:
            _record(url, each, expected, outputs[:len(STAGE_OUTPUTS[each])])


def guard_ingest(data_url: str, dataset: str, image_size: Optional[int] = None,
                 attributes: Optional[dict[str, Any]] = None) -> None:
    """At the start of ingest: refuse a DATA made from another dataset (or image size, or
    attributes), else record what this ingest makes."""
    from .data.meta import META_NAME

    url = storage.join(data_url, FINGERPRINT_NAME)
    expected = _json_values(ingest_fields(dataset, image_size, attributes))
    if not _refuse_if_different(url, "ingest", expected, _data_remedy(data_url)):
        _record(url, "ingest", expected, [storage.join(data_url, META_NAME)])
