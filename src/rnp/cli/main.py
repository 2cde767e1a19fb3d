"""``rnp``: train backdoored models, purify them with RNP, measure the result.

Every subcommand calls the Python API; errors caused by the input print one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from rnp import __version__
from rnp.attacks import ATTACKS
from rnp.bench.executors import EXECUTORS
from rnp.cli import bench, commands, inspection
from rnp.cli.inspection import UNLEARN_FIELDS
from rnp.cli.options import add_config_options, clean_size, count, finite_float, threads
from rnp.defenses import DEFENSES, RNPConfig
from rnp.defenses.neural_cleanse import BUDGETS
from rnp.defenses.trigger_reverse import TriggerReverseConfig
from rnp.metrics.collapse import MAP_AGREEMENT_THRESHOLD, RUNS as COLLAPSE_RUNS, SUBSET as COLLAPSE_SUBSET
from rnp.detection.exposure import EBYD_VARIANCE_THRESHOLD, LABEL_ANOMALY_THRESHOLD
from rnp.detection.poisoned_samples import SAMPLE_DETECTORS
from rnp.detection.sample_scan import SCAN_DETECTORS
from rnp.errors import RnpError
from rnp.models import MODEL_NAMES
from rnp.training import TrainConfig

DEMO_ATTACKS = ("badnets", "blend", "trojan", "wanet", "low_frequency", "bpp")


class _Parser(argparse.ArgumentParser):
    """Reports a command-line mistake on one line, like every other input error."""

    def error(self, message: str):
        self.exit(2, f"rnp: error: {message} (see `{self.prog} --help`)\n")


def build_parser(method: str = "rnp") -> argparse.ArgumentParser:
    """The whole command line; ``rnp defend`` takes the settings of defense ``method``."""
    parser = _Parser(prog="rnp", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"rnp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="train a small backdoored model on the embedded data, "
                                       "purify it with RNP, print before/after")
    demo.add_argument("--data", help="dataset spec (default: the embedded 6,000-image CIFAR-10 slice)")
    demo.add_argument("--out", default="rnp-demo", help="run folder to write (default: rnp-demo)")
    demo.add_argument("--epochs", type=int, default=None,
                      help="training epochs (default: 15 on the embedded data, 30 otherwise)")
    demo.add_argument("--width", type=int, default=16)
    demo.add_argument("--attack", choices=DEMO_ATTACKS, default="badnets",
                      help="a data-poisoning attack at 10%% (the others need a reference model "
                           "or train generators: use `rnp train`)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--clean-size", type=clean_size, default=500,
                      help="clean images for RNP: a count, or a fraction of the training split (default 500)")
    _add_force(demo, "OUT/rnp")
    _add_common(demo)
    demo.set_defaults(handler=commands.demo, resumable=True)

    train = sub.add_parser("train", help="train a (backdoored) model into a run folder")
    train.add_argument("--data", required=True, help="CIFAR-10 folder, image-folder tree or .zip")
    train.add_argument("--model", default="preact_resnet18", choices=MODEL_NAMES)
    train.add_argument("--width", type=int, default=16, help="base channels; 64 = paper size")
    _add_attack_options(train)
    train.add_argument("--holdout", type=count, default=0,
                       help="keep this many clean training images out of training, for the "
                            "defender's clean set (default 0: the defender draws from the "
                            "unpoisoned training images, as the official RNP code does)")
    train.add_argument("--reference-run",
                       help="clean run folder on the same data, for attacks fitted on a clean model "
                            "(label_consistent, trojan with optimize=true, low_frequency with "
                            "optimize=true)")
    train.add_argument("--out", required=True, help="run folder to write; an interrupted run "
                                                    "there resumes, a finished one is reused")
    train.add_argument("--force", action="store_true",
                       help="retrain: delete the run in --out (its record files, model, metrics "
                            "and checkpoint) and train it anew; a folder holding other files as "
                            "well is refused")
    add_config_options(train, TrainConfig)
    _add_common(train)
    train.set_defaults(handler=commands.train, resumable=True)

    evaluate = sub.add_parser("evaluate", help="CA / ASR / RA of a run's model or of another model file")
    evaluate.add_argument("--run", required=True, help="run folder written by `rnp train`")
    evaluate.add_argument("--model", help="weights to evaluate instead of the run's own")
    evaluate.add_argument("--out", help="metrics JSON to write (default: metrics.json beside the model)")
    _add_common(evaluate)
    evaluate.set_defaults(handler=commands.evaluate)

    defend = sub.add_parser("defend", help="purify a model with a removal defense (see --list)")
    defend.add_argument("--list", action="store_true", help="list the defenses and exit")
    defend.add_argument("--method", default="rnp", choices=sorted(DEFENSES),
                        help="the defense (default rnp); the settings shown below are this "
                             "method's: `rnp defend --method NAME --help` lists another's")
    defend.add_argument("--run", help="run folder written by `rnp train`")
    defend.add_argument("--model", help="model weights (.safetensors or a PyTorch state dict)")
    defend.add_argument("--data", help="dataset spec the clean images are drawn from (with --model)")
    defend.add_argument("--arch", choices=MODEL_NAMES,
                        help="architecture of --model (read from rnp's own safetensors otherwise)")
    defend.add_argument("--width", type=int, help="width of --model's architecture")
    defend.add_argument("--out", help="folder for the purified model and reports")
    _add_force(defend)
    defend.add_argument("--clean-size", type=clean_size, default=500,
                        help="clean images: a count, or a fraction of the training split (default 500)")
    defend.add_argument("--clean-seed", type=int, default=0)
    defend.add_argument("--stratified", action="store_true", help="equal clean images per class")
    if method == "rnp":
        defend.add_argument("--preset", choices=["default", "paper"], default="default",
                            help="'paper' is the published recipe; options below override either")
        defend.add_argument("--oracle-sweep", action="store_true",
                            help="ORACLE ANALYSIS: also measure test CA/ASR at every mask threshold "
                                 "0.00..0.90 (uses test data; never used to choose)")
    if method == "nc":
        defend.add_argument("--budget", choices=sorted(BUDGETS), default="cpu",
                            help="'cpu' (default): 120 search steps of 64 images per class; "
                                 "'paper': the published 1000 steps of 1000 images, days on a "
                                 "CPU; --steps / --samples-per-step override either")
    add_config_options(defend, DEFENSES[method].config_class)
    _add_common(defend)
    defend.set_defaults(handler=commands.defend)

    inspect = sub.add_parser("inspect", help="what the unlearned model reveals: is the model "
                                             "backdoored, its target label, its trigger")
    _add_subject_options(inspect)
    inspect.add_argument("--label-threshold", type=finite_float, default=LABEL_ANOMALY_THRESHOLD,
                         help="anomaly index at which the top class is named the target (default 2)")
    inspect.add_argument("--variance-threshold", type=finite_float, default=EBYD_VARIANCE_THRESHOLD,
                         help="variance of the class shares above which the model is called "
                              "backdoored (default 0.01, EBYD's)")
    inspect.add_argument("--runs", type=int, default=COLLAPSE_RUNS,
                         help="unlearnings on random parts of the clean images whose agreement gives "
                              f"the verdict (default {COLLAPSE_RUNS}; 0 skips it)")
    inspect.add_argument("--run-subset", type=finite_float, default=COLLAPSE_SUBSET,
                         help=f"share of the clean images each of those unlearnings draws (default {COLLAPSE_SUBSET})")
    inspect.add_argument("--map-threshold", type=finite_float, default=MAP_AGREEMENT_THRESHOLD,
                         help="map agreement above which the model is called backdoored "
                              f"(default {MAP_AGREEMENT_THRESHOLD}, fixed on development models)")
    inspect.add_argument("--clean-reports", nargs="+", metavar="REPORT",
                         help="report.json of `rnp inspect` on models known to be clean: the threshold is "
                              "set from their map agreements at --fpr instead")
    inspect.add_argument("--fpr", type=finite_float, default=0.05,
                         help="false-positive rate on the --clean-reports models (default 0.05)")
    inspect.add_argument("--target", type=int, help="recover the trigger of this class instead of "
                                                    "the detected one")
    inspect.add_argument("--no-trigger", action="store_true", help="skip the trigger recovery")
    inspect.add_argument("--trigger-seed", type=int, default=0)
    add_config_options(inspect, TriggerReverseConfig, prefix="trigger-")
    inspect.set_defaults(handler=inspection.inspect)

    scan = sub.add_parser("scan-data", help="score every training sample: which ones are poisoned")
    _add_subject_options(scan)
    scan.add_argument("--poisoned-indices", help="with --data: file of known poisoned training "
                                                 "indices (one per line), for AUROC")
    scan.add_argument("--detectors", nargs="+", choices=sorted(SAMPLE_DETECTORS),
                      help=f"detectors to run and combine (default: {' '.join(SCAN_DETECTORS)})")
    scan.add_argument("--fpr", type=finite_float, default=0.05,
                      help="share of your clean images each flag threshold flags (default 0.05)")
    scan.add_argument("--folds", type=int, default=2,
                      help="folds of the clean images, cross-fitting the unlearning and STRIP (default 2)")
    scan.add_argument("--samples", type=int, help="score a seeded random subset of this many samples")
    scan.add_argument("--sample-seed", type=int, default=0)
    scan.add_argument("--strip-overlays", type=int, default=100, help="STRIP's N (paper: 100)")
    scan.set_defaults(handler=inspection.scan_data)

    grid = sub.add_parser("bench", help="run a benchmark grid (datasets x models x attacks x rates "
                                        "x seeds x defenses), resumable; write tables and plots")
    grid.add_argument("grid", nargs="+", help="grid file(s) (YAML), e.g. benchmarks/grids/cpu.yaml; "
                                              "several run one after another")
    grid.add_argument("--out", help="results folder of a single grid (default: the grid's 'output', "
                                    "else bench-results/NAME)")
    grid.add_argument("--cache", help="backdoored-model cache (default: the grid's 'cache', else OUT/models)")
    grid.add_argument("--executor", choices=sorted(EXECUTORS), default="local",
                      help="local: this process; ray: one Ray task per cell (pip install 'rnp-backdoor[ray]')")
    grid.add_argument("--ray-address", help="a running Ray cluster's address (default: start a local one)")
    grid.add_argument("--compare", action="store_true",
                      help="put published numbers (BackdoorBench, the official RNP log) beside ours")
    grid.add_argument("--report-only", action="store_true", help="write the report from finished cells, run nothing")
    grid.add_argument("--defenses", nargs="+", metavar="ROW",
                      help="run only these defense rows of the grid (e.g. `none` to train its subjects)")
    grid.add_argument("--subjects", nargs="+", metavar="LABEL",
                      help="run only these subjects, in this order (labels as the report prints them, e.g. "
                           "`trojan` or `clean`), so that two training runs can share out a grid's subjects")
    grid.add_argument("--keep-older", action="store_true",
                      help="count a cell as done when older code computed it with the same settings "
                           "(the report lists every record's code) instead of recomputing it")
    grid.add_argument("--trained-only", action="store_true",
                      help="train nothing: skip the cells whose subject is not in the cache yet (to defend "
                           "the subjects a training run has finished, beside it)")
    _add_common(grid)
    grid.set_defaults(handler=bench.bench, resumable=True)
    return parser


def _add_subject_options(parser: argparse.ArgumentParser) -> None:
    """Where the model and the clean images come from, the output folder, and the unlearning
    settings (RNP's stage 1, which makes the exposure)."""
    parser.add_argument("--run", help="run folder written by `rnp train`")
    parser.add_argument("--model", help="model weights (.safetensors or a PyTorch state dict)")
    parser.add_argument("--data", help="dataset spec (with --model)")
    parser.add_argument("--arch", choices=MODEL_NAMES, help="architecture of --model")
    parser.add_argument("--width", type=int, help="width of --model's architecture")
    parser.add_argument("--out", required=True, help="folder for the reports and figures")
    _add_force(parser)
    parser.add_argument("--clean-size", type=clean_size, default=500,
                        help="clean images: a count, or a fraction of the training split (default 500)")
    parser.add_argument("--clean-seed", type=int, default=0)
    add_config_options(parser, RNPConfig, skip=tuple(f.name for f in dataclasses.fields(RNPConfig)
                                                     if f.name not in UNLEARN_FIELDS))
    _add_common(parser)


def _add_force(parser: argparse.ArgumentParser, folder: str = "--out") -> None:
    parser.add_argument("--force", action="store_true",
                        help=f"write into a non-empty {folder}, replacing the files an earlier rnp "
                             "command wrote there (they are deleted when the new ones are written; "
                             "anything else there is kept)")


def _add_attack_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attack", choices=["none", *sorted(ATTACKS)], default="none")
    parser.add_argument("--poison-rate", type=finite_float,
                        help="fraction of the training set to poison (default: the attack's own, "
                             "from its paper; 0.1 for most)")
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--mode", choices=["all2one", "all2all"], default="all2one")
    parser.add_argument("--attack-seed", type=int, default=0)
    parser.add_argument("--trigger", action="append", default=[], metavar="KEY=VALUE",
                        help="trigger parameter, e.g. size=4, location=[0,0], alpha=0.1, "
                             "patch=white, pattern=IMAGE_FILE (repeatable)")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", help="where decoded datasets are cached "
                                            "(default: $RNP_CACHE_DIR or ~/.cache/rnp)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (the time estimates of long work are still printed)")
    parser.add_argument("--threads", type=threads,
                        help="CPU threads torch computes with (default: torch's choice, usually "
                             "one per core); `rnp bench`: per cell")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA if available, else MPS, else the CPU), cpu, cuda, "
                             "cuda:N or mps (default: auto)")


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand and returns the exit status (0, 2 for an input error, 130 if interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_chosen_method(argv))
    try:
        args, unknown = parser.parse_known_args(argv)
    except SystemExit as stop:  # --help, --version, or a command-line mistake already reported
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    if unknown:
        return _fail(_unrecognized(args, unknown))
    previous_threads = torch.get_num_threads()
    try:
        if args.threads is not None:  # before any work, so every stage computes with them
            torch.set_num_threads(args.threads)
        with commands.estimate_lines():
            return args.handler(args) or 0
    except RnpError as error:
        return _fail(str(error))
    except OSError as error:  # a path the user gave cannot be read or written
        where = f"{error.filename}: " if error.filename else ""
        return _fail(f"{where}{error.strerror or error}")
    except KeyboardInterrupt:
        resume = ": rerun the same command to resume" if getattr(args, "resumable", False) else ""
        print(f"rnp: interrupted{resume}", file=sys.stderr)
        return 130
    finally:  # a caller running several commands in one process keeps its own setting
        torch.set_num_threads(previous_threads)


def _chosen_method(argv: list[str]) -> str:
    """The ``--method`` of an ``rnp defend`` command line, so that its settings become options.

    An unknown name falls back to rnp here; argparse then rejects it with the list of choices.
    """
    if not argv or argv[0] != "defend":
        return "rnp"
    for index, item in enumerate(argv):
        value = item.split("=", 1)[1] if item.startswith("--method=") else (
            argv[index + 1] if item == "--method" and index + 1 < len(argv) else None)
        if value is not None:
            return value if value in DEFENSES else "rnp"
    return "rnp"


def _unrecognized(args: argparse.Namespace, unknown: list[str]) -> str:
    """Unknown arguments, pointing to the help of the command given; for ``rnp defend``, an
    option of another defense names the methods it belongs to."""
    message = f"unrecognized arguments: {' '.join(unknown)}"
    if args.command != "defend":
        return f"{message} (see `rnp {args.command} --help`)"
    see = f"(see `rnp defend --method {args.method} --help`)"
    flag = next((item.split("=", 1)[0] for item in unknown if item.startswith("--")), None)
    owners = [name for name in sorted(DEFENSES) if flag and flag in _defend_options(name)]
    if owners:
        methods = " or ".join(f"--method {name}" for name in owners)
        return f"{message}: {flag} is a setting of {methods}, not of --method {args.method} {see}"
    return f"{message} {see}"


def _defend_options(method: str) -> set[str]:
    """The option strings ``rnp defend --method METHOD`` takes."""
    parser = build_parser(method)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(commands.choices["defend"]._option_string_actions)


def _fail(message: str) -> int:
    print("rnp: error: " + " ".join(message.split()), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
