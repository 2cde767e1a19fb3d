"""The subcommands: each parses nothing itself, calls the API and reports."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import types
import typing
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from rnp.attacks import ATTACKS, build_attack
from rnp.cli.inputs import input_paths, outside_model
from rnp.cli.options import config_overrides
from rnp.cli.tables import metrics_table
from rnp.data.clean_subset import select_clean_subset
from rnp.data.demo import DEMO_DATASET_PATH
from rnp.data.sources import load_dataset
from rnp.defenses import DEFENSES, RNP, NeuralCleanse, threshold_sweep
from rnp.defenses.base import MIN_CLEAN_IMAGES
from rnp.errors import RnpError
from rnp.io.files import check_output_path, read_json, write_json
from rnp.io.tables import render_table
from rnp.metrics import accuracy, der, evaluate_backdoor
from rnp.progress import logger as progress_logger
from rnp.runs.folder import (METRICS_FILE, MODEL_FILE, RECORD_FILES, RUN_FILE, load_run, record_files,
                             run_inputs)
from rnp.runs.outputs import prepare_output_dir, remove_previous_outputs, write_defense_outputs
from rnp.runs.training import train_run
from rnp.training import TrainConfig, predict
from rnp.utils import model_device, resolve_device


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def train(args) -> int:
    attack = _attack_from_args(args)
    config = TrainConfig(**config_overrides(args, TrainConfig))
    inputs = [Path(args.data), *(record_files(args.reference_run) if args.reference_run else ())]
    out = check_output_path(args.out, inputs, folder=True)
    _check_holdout(args.holdout, args.data, args.cache_dir)
    device = resolve_device(args.device)
    if args.force:
        _remove_run(out)
    finished, started = (out / MODEL_FILE).exists(), (out / RUN_FILE).exists()
    if started and not finished:
        _log(f"resuming the interrupted training in {out}")
    out = train_run(out, args.data, arch=args.model, width=args.width, attack=attack,
                    config=config, holdout=args.holdout, reference_run=args.reference_run,
                    cache_dir=args.cache_dir, progress=not args.quiet, log=_log, device=device)
    if finished:  # train_run checked that it is this very run
        _log(f"reused the finished run in {out}: it was trained with these settings "
             "(give --force to train it again)")
    metrics = json.loads((out / METRICS_FILE).read_text())
    print(metrics_table({"model": metrics}))
    print(f"run folder: {out}")
    return 0


def _remove_run(out: Path) -> None:
    """``rnp train --force``: deletes the run in ``out`` (its record files and metrics), so that
    it is trained anew. Refused, with nothing deleted, when ``out`` holds other files too:
    training needs an empty folder, and the user's files are never deleted."""
    if not (out / RUN_FILE).exists():
        return
    run_files = [out / name for name in (*RECORD_FILES, METRICS_FILE)]
    others = sorted(path.name for path in out.iterdir() if path not in run_files)
    if others:
        raise RnpError(f"{out} holds more than a training run ({', '.join(others)}); --force "
                       "replaces only a run folder, choose another --out")
    for path in run_files:
        path.unlink(missing_ok=True)


def _check_holdout(holdout: int, data_spec, cache_dir) -> None:
    """``--holdout`` must leave images to train on; said in its own words, not the clean set's."""
    if holdout:
        total = len(load_dataset(data_spec, cache_dir=cache_dir).train)
        if holdout >= total:
            raise RnpError(f"--holdout {holdout}: {data_spec} has only {total} training images; "
                           "hold out fewer")


def evaluate(args) -> int:
    device = resolve_device(args.device)
    run_dir = Path(args.run)
    model_file = Path(args.model) if args.model else run_dir / MODEL_FILE
    out = Path(args.out) if args.out else model_file.parent / METRICS_FILE
    check_output_path(out, [model_file, *run_inputs(run_dir)], folder=False)
    own_record = _own_record(out, run_dir, model_file)
    run = load_run(run_dir, cache_dir=args.cache_dir, model_file=args.model)
    metrics = evaluate_backdoor(run.model.to(device), run.data.test, run.triggered_test()).to_dict()
    if own_record and out.is_file():  # keep what `rnp train` recorded beside the metrics
        try:
            previous = read_json(out)
        except RnpError:
            previous = None
        if isinstance(previous, dict):
            metrics = {**previous, **metrics}
    write_json(out, metrics)
    print(metrics_table({"model": metrics}))
    print(f"metrics: {out}")
    return 0


def _own_record(out: Path, run_dir: Path, model_file: Path) -> bool:
    """Whether ``rnp evaluate`` writes the run's own metrics.json for the run's own model (then
    it merges into it, keeping what training recorded).

    Any other file of a run folder is refused: a run's files hold what that run's own model
    measured, never another model's numbers nor numbers measured on another run's data and trigger.
    """
    if out.resolve() == (run_dir / METRICS_FILE).resolve():
        if model_file.resolve() == (run_dir / MODEL_FILE).resolve():
            return True
    elif not (out.name in (*RECORD_FILES, METRICS_FILE) and (out.parent / RUN_FILE).is_file()):
        return False
    raise RnpError(f"{out} belongs to the run in {out.parent}; metrics of {model_file} measured on "
                   f"{run_dir}'s data and trigger need another --out")


def defend(args) -> int:
    if args.list:
        rows = [[name, cls.summary] for name, cls in sorted(DEFENSES.items())]
        print(render_table([["method", "description"], *rows]))
        return 0
    if not args.out:
        raise RnpError("--out is required")
    if bool(args.run) == bool(args.data):
        raise RnpError("give either --run DIR, or --model FILE with --data SPEC")
    if args.data and not args.model:
        raise RnpError("--data needs --model FILE (the model to purify)")
    device = resolve_device(args.device)
    defense = _defense_from_args(args)
    label = f"{defense.name} (preset {args.preset})" if isinstance(defense, RNP) else defense.name
    options = dict(device=device, clean_seed=args.clean_seed, stratified=args.stratified,
                   oracle_sweep=getattr(args, "oracle_sweep", False), force=args.force, label=label)
    if args.run:
        return defend_run(defense, args.run, args.out, args.clean_size, model_file=args.model,
                          cache_dir=args.cache_dir, **options)
    out = prepare_output_dir(args.out, input_paths(args), force=args.force)
    data = load_dataset(args.data, cache_dir=args.cache_dir)
    model, spec = outside_model(args, data)
    clean, _ = select_clean_subset(data.train, args.clean_size, seed=args.clean_seed,
                                   stratified=args.stratified)
    return _purify(defense, model, spec, data, clean, None, out, **options)


def defend_run(defense, run_dir, out, clean_size: int | float, *, device: torch.device,
               model_file=None, cache_dir=None, clean_seed: int = 0, stratified: bool = False,
               oracle_sweep: bool = False, force: bool = False, label: str) -> int:
    """``rnp defend --run``: purifies the model of a run folder (or ``model_file`` on its data)
    with ``defense`` on ``clean_size`` clean images, writes the outputs into ``out`` and prints
    before/after. ``rnp demo`` ends with it."""
    inputs = [Path(model_file)] if model_file else []
    out = prepare_output_dir(out, inputs + run_inputs(run_dir), force=force)
    run = load_run(run_dir, cache_dir=cache_dir, model_file=model_file)
    clean, _ = run.clean_images(clean_size, seed=clean_seed, stratified=stratified)
    return _purify(defense, run.model, run.info["model"], run.data, clean, run.triggered_test(), out,
                   device=device, clean_seed=clean_seed, stratified=stratified,
                   oracle_sweep=oracle_sweep, force=force, label=label)


def _purify(defense, model, spec, data, clean, triggered, out: Path, *, device, clean_seed: int,
            stratified: bool, oracle_sweep: bool, force: bool, label: str) -> int:
    """Fits ``defense`` on ``clean``, measures the model before and after, writes and prints."""
    with _library_warnings():
        result = defense.fit(model.to(device), clean)
    sweep = _rnp_sweep(oracle_sweep, result, clean, data, triggered) if isinstance(defense, RNP) else None
    before = evaluate_backdoor(model, data.test, triggered)
    after = evaluate_backdoor(result.model, data.test, triggered)
    report = {**result.report,
              "clean_set": {"size": len(clean), "seed": clean_seed, "stratified": stratified},
              "device": str(device),
              "metrics": {"before": before.to_dict(), "after": after.to_dict(),
                          "der": der(before, after) if triggered is not None else None}}
    if isinstance(defense, RNP):
        report["oracle_sweep_included"] = oracle_sweep
    if force:
        remove_previous_outputs(out)
    write_defense_outputs(out, result, spec, report, sweep)
    print(metrics_table({"before": before.to_dict(), "after": after.to_dict()}))
    print(_summary_line(label, result, len(clean)))
    print(f"outputs: {out}")
    return 0


def _defense_from_args(args):
    cls = DEFENSES[args.method]
    overrides = config_overrides(args, cls.config_class)
    if cls is RNP:
        preset = None if args.preset == "default" else args.preset
        return RNP(preset=preset, progress=not args.quiet, **overrides)
    if cls is NeuralCleanse:
        return NeuralCleanse(budget=args.budget, progress=not args.quiet, **overrides)
    return cls(progress=not args.quiet, **overrides)


def _rnp_sweep(oracle_sweep: bool, result, clean, data, triggered) -> list[dict]:
    """RNP's defender-side view of every mask threshold, plus the labelled oracle columns when
    asked for."""
    def clean_set_accuracy(pruned):
        return {"clean_set_accuracy": accuracy(predict(pruned, clean, device=model_device(pruned)),
                                               clean.labels)}

    def oracle(pruned):
        return {f"oracle_{k}": v for k, v in evaluate_backdoor(pruned, data.test, triggered).to_dict().items()}

    evaluate_row = (lambda m: {**clean_set_accuracy(m), **oracle(m)}) if oracle_sweep else clean_set_accuracy
    return threshold_sweep(result, evaluate_row)


def _summary_line(label: str, result, clean_size: int) -> str:
    parts = [f"{label} on {clean_size} clean images"]
    pruning = result.report.get("pruning")
    if pruning:
        parts.append(f"pruned {pruning['pruned']} of {pruning['total_channels']} channels "
                     f"(rule: {pruning['rule']})")
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    return ": ".join(parts) + ("; " + timings if timings else "")


class _WarningLines(logging.Handler):
    """Prints what the library logs (a defense's ``report["warnings"]``, on the ``rnp`` logger)
    as ``warning: ...`` lines on stderr; while it is attached Python's own fallback printing of
    the same records is skipped, so each warning appears once."""

    def emit(self, record: logging.LogRecord) -> None:
        _log(f"warning: {record.getMessage()}")


@contextlib.contextmanager
def _library_warnings():
    """Shows the library's warnings in the CLI's format for the duration of the block."""
    logger, handler = logging.getLogger("rnp"), _WarningLines(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


class _EstimateLines(logging.Handler):
    """Prints the time estimates of long work (:mod:`rnp.progress`) on stderr, above any
    progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        tqdm.write(record.getMessage(), file=sys.stderr)


@contextlib.contextmanager
def estimate_lines():
    """Shows the library's time estimates for the duration of the block (they are INFO records,
    which Python's logging drops unless asked to show them)."""
    logger, handler = progress_logger, _EstimateLines(logging.INFO)
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def demo(args) -> int:
    data_spec = args.data or str(DEMO_DATASET_PATH)
    epochs = args.epochs if args.epochs is not None else (15 if args.data is None else 30)
    attack = build_attack(args.attack, target=0, poison_rate=0.1)
    device = resolve_device(args.device)
    check_output_path(args.out, [data_spec], folder=True)
    prepare_output_dir(Path(args.out) / "rnp", force=args.force)
    _check_demo_clean_size(args.clean_size, data_spec, args.cache_dir)
    header = (f"training a backdoored preact_resnet18 (width {args.width}) on {data_spec} for {epochs} "
              f"epochs on {device}")

    def log(message: str) -> None:  # the header waits for training to start, so an error stays one line
        nonlocal header
        if header:
            _log(header)
            header = ""
        _log(message)

    out = train_run(args.out, data_spec, width=args.width, attack=attack,
                    config=TrainConfig(epochs=epochs, seed=args.seed, augment=args.data is not None),
                    holdout=args.clean_size, cache_dir=args.cache_dir, progress=not args.quiet, log=log,
                    device=device)
    defense = RNP(progress=not args.quiet, seed=args.seed)
    return defend_run(defense, out, out / "rnp", args.clean_size, device=device, cache_dir=args.cache_dir,
                      force=args.force, label=f"{defense.name} (preset default)")


def _check_demo_clean_size(size, data_spec, cache_dir) -> None:
    """The demo holds ``--clean-size`` training images out of training for RNP: a size it cannot
    draw, or one leaving RNP too few images or training none, is refused before training."""
    train = load_dataset(data_spec, cache_dir=cache_dir).train
    count = len(select_clean_subset(train, size)[0])
    if not MIN_CLEAN_IMAGES <= count < len(train):
        raise RnpError(f"--clean-size {size}: the demo holds these images out of training for RNP; "
                       f"give {MIN_CLEAN_IMAGES} to {len(train) - 1} images")


# Attack parameters with their own options; --trigger sets only the trigger's parameters.
_ATTACK_OPTIONS = {"target": "--target", "mode": "--mode", "poison_rate": "--poison-rate",
                   "seed": "--attack-seed"}


def _attack_from_args(args):
    if args.attack == "none":
        if args.trigger:
            raise RnpError("--trigger needs --attack")
        return None
    params = dict(_parse_trigger(ATTACKS[args.attack], item) for item in args.trigger)
    if args.poison_rate is not None:
        params["poison_rate"] = args.poison_rate
    return build_attack(args.attack, target=args.target, mode=args.mode, seed=args.attack_seed,
                        **params)


def _parse_trigger(attack_cls, item: str):
    """``KEY=VALUE`` converted to the type the attack declares for ``KEY``."""
    key, sep, raw = item.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise RnpError(f"--trigger takes KEY=VALUE, got {item!r}")
    if key in _ATTACK_OPTIONS:
        raise RnpError(f"set {key} with {_ATTACK_OPTIONS[key]}, not --trigger")
    kind = typing.get_type_hints(attack_cls).get(key)
    if kind is None:
        return key, raw  # build_attack names the parameters the attack takes
    return key, _convert(key, raw.strip(), kind)


def _convert(key: str, raw: str, kind):
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    if type(None) in options and raw.lower() in ("none", "null"):
        return None
    kind = next(option for option in options if option is not type(None))
    if kind is torch.Tensor:
        return _read_image(raw)
    origin, elements = typing.get_origin(kind), typing.get_args(kind)
    try:
        if kind is bool:
            return {"true": True, "1": True, "false": False, "0": False}[raw.lower()]
        if kind in (int, float):
            return kind(raw)
        if origin is tuple:
            parts = [part.strip() for part in raw.strip("[]()").split(",")]
            variadic = len(elements) == 2 and elements[1] is Ellipsis
            if not variadic and len(parts) != len(elements):
                raise ValueError
            return tuple(elements[0](part) for part in parts)
    except (ValueError, KeyError):
        expected = {bool: "true or false", int: "an integer", float: "a number"}.get(
            kind, f"{len(elements)} comma-separated values, e.g. {key}=0,0")
        raise RnpError(f"--trigger {key}={raw!r}: expected {expected}") from None
    return raw


def _read_image(path: str) -> torch.Tensor:
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    except (OSError, UnidentifiedImageError) as error:
        raise RnpError(f"{path}: cannot read the pattern image ({error})") from None
    return torch.from_numpy(array.transpose(2, 0, 1).copy())
