"""The benchmark studies as grids: attack properties, RNP settings over clean seeds with the
oracle ranking, cost with repeats, exposure (with cleansing) on clean and backdoored subjects,
every grid file of ``benchmarks/grids/``, and ``--report-only`` over several grids.

Each study runs end to end on the tiny dataset of ``test_bench_grid`` (width-4 models, one
epoch): the numbers are meaningless, every path runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rnp.bench import grid as grid_module
from rnp.bench.grid import parse_grid
from rnp.cli.main import main
from rnp.detection import collapse_map, judge
from rnp.errors import RnpError

from helpers import write_dataset
from test_bench_grid import FT_FAST, RNP_FAST, grid_dict, records, write_grid
from test_cli import _environment  # noqa: F401 (autouse fixture: private cache, one thread)

GRIDS = Path(__file__).resolve().parents[1] / "benchmarks" / "grids"

EXPOSURE_FAST = {"samples": 60, "strip_overlays": 2, "trigger_steps": 2, "trigger_samples_per_step": 16}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), classes=3, n_train=90, n_test=30)


def study(root: Path, data: Path, name: str, **overrides) -> tuple[Path, str, Path]:
    """Runs a tiny grid through the CLI: (output folder, results.md, grid file)."""
    grid = write_grid(root / f"{name}.yaml", grid_dict(data, name=name, retuning=None,
                                                       output=str(root / name), **overrides))
    assert main(["bench", str(grid), "--cache", str(root / "models"), "--device", "cpu", "--quiet"]) == 0
    return root / name, (root / name / "results.md").read_text(), grid


@pytest.fixture(scope="module")
def studies(tmp_path_factory, data) -> dict:
    """The four study kinds, run once into one folder (sharing the subject cache)."""
    root = tmp_path_factory.mktemp("studies")
    rnp_rows = {"none": {}, "rnp": RNP_FAST,
                "rnp (threshold)": {"defense": "rnp", **RNP_FAST, "ranking": "masks", "prune_rule": "threshold"}}
    return {
        "attacks": study(root, data, "attacks", defenses={"none": {}}, attack_properties=True),
        "rnp": study(root, data, "rnp", defenses=rnp_rows, clean_seeds=[0, 1], prune_counts=[1, 2],
                     cost_floor=False),
        "cost": study(root, data, "cost", defenses={"rnp": RNP_FAST}, repeats=2, curve_images=0),
        "exposure": study(root, data, "exposure", defenses={"none": {}},
                          attacks=[{"name": "none", "seeds": [0, 1]}, "badnets"],
                          exposure={**EXPOSURE_FAST, "cleanse": True, "nc_scan": True}),
        "labels": study(root, data, "labels", defenses={"none": {}},
                        attacks=[{"name": "none", "seeds": [0]}, "badnets"],
                        label_runs={"runs": 3, "subset": 0.5, "amp": "off"}),
        "recalibration": study(root, data, "recalibration", defenses={"none": {}, "rnp": RNP_FAST},
                               recalibration=True, curve_images=0),
    }


def test_attack_properties_are_measured_in_the_undefended_cell(studies):
    out, text, _ = studies["attacks"]
    [record] = records(out)
    properties = record["attack_properties"]
    assert properties["mode"] == "all2one" and properties["poisoning"] == "10%"
    assert 0 <= properties["clean_twin_accuracy"] <= 1 and properties["train_seconds"] > 0
    assert 0 < properties["train_cpu_seconds"]
    assert record["cell"]["attack_properties"] is True
    assert "## Attack properties" in text and "| tiny | preact_resnet18-w4 | badnets | 0 | all2one | 10% |" in text


def test_rnp_settings_over_clean_seeds_with_the_oracle_ranking(studies):
    out, text, _ = studies["rnp"]
    rows = records(out)
    assert len(rows) == 6 and {r["cell"]["clean_seed"] for r in rows} == {0, 1}
    by_seed = {r["cell"]["clean_seed"]: r for r in rows if r["label"]["defense"] == "none"}
    assert by_seed[0]["clean_indices"] != by_seed[1]["clean_indices"]  # one subject, two clean sets
    assert by_seed[0]["subject_run"] == by_seed[1]["subject_run"]
    assert all(r["subject_training"]["seconds"] > 0 and r["subject_training"]["cpu_seconds"] > 0 for r in rows)
    assert "## Subjects" in text and "| tiny | preact_resnet18-w4 | badnets | 0 |" in text
    ranked = [r for r in rows if r["label"]["defense"] != "none"]
    assert all([p["count"] for p in r["rnp"]["prefix_curve"]] == [1, 2] for r in ranked)
    assert all(r["cell"]["defense_config"]["seed"] == r["cell"]["clean_seed"] for r in ranked)
    # the default order keeps what the unlearned model collapsed onto; the masks' order has none
    assert {("ranking" in r["summary"]) for r in ranked} == {True, False}
    assert all(0 < r["summary"]["ranking"]["share"] <= 1 for r in ranked if "ranking" in r["summary"])
    assert all(r["cell"]["cost_floor"] is False and "floor_seconds" not in r["rnp"] for r in ranked)
    assert "RNP / floor" not in text
    assert "## Spread over seeds" in text and "| tiny | preact_resnet18-w4 | badnets | rnp (threshold) | 2 |" in text
    assert "## RNP's ranking of the channels (oracle analysis)" in text and "ASR@2" in text
    assert "## Defenses side by side" in text and "| attack | none | rnp | rnp (threshold) |" in text
    assert "## Each clean set" in text and "(clean sets 0 / 1 unless a cell names its own)" in text
    assert (out / "rnp_ranking.png").stat().st_size > 1000


def test_recalibration_measures_every_defended_model_again_after_new_statistics(studies):
    out, text, _ = studies["recalibration"]
    rows = {r["label"]["defense"]: r for r in records(out)}
    assert set(rows) == {"none", "rnp"}
    for record in rows.values():
        assert record["cell"]["recalibration"] is True and record["recalibrated"]["status"] == "ok"
        assert 0 <= record["recalibrated"]["clean_accuracy"] <= 1
        assert 0 <= record["recalibrated"]["attack_success_rate"] <= 1
    header = next(line for line in text.splitlines() if line.startswith("| dataset"))
    assert header.rstrip().endswith("| CA recalibrated | ASR recalibrated |")
    csv = (out / "results.csv").read_text().splitlines()[0]
    assert csv.endswith("recalibrated_ca,recalibrated_asr")


def test_cost_cells_repeat_and_check_the_result(studies):
    out, text, _ = studies["cost"]
    [record] = records(out)
    assert len(record["repeats"]["seconds"]) == 2 and record["repeats"]["agree"] is True
    assert record["seconds"] == pytest.approx(sum(record["repeats"]["seconds"]) / 2)  # the median of two
    assert record["rnp"]["floor_ratio"] > 0 and "curve" not in record["rnp"]
    assert "| 2 (median; same model) |" in text


def test_exposure_of_clean_and_backdoored_subjects(studies):
    out, text, _ = studies["exposure"]
    rows = {(r["label"]["attack"], r["label"]["seed"]): r for r in records(out)}
    assert set(rows) == {("clean", 0), ("clean", 1), ("badnets", 0)}
    clean, backdoored = rows[("clean", 1)], rows[("badnets", 0)]
    assert clean["exposure"]["backdoored"] is False and "trigger" not in clean["exposure"]
    assert clean["der"] is None and clean["cell"]["attack_spec"] is None
    exposure = backdoored["exposure"]
    assert exposure["true_target"] == 0 and set(exposure["trigger"]["models"]) == {"unlearned", "original"}
    assert exposure["samples"]["scored"] == 60 and set(exposure["samples"]["detectors"]) == {
        "unlearned", "loss", "ac", "ss", "strip"}
    assert exposure["cleansing"]["poisoned"] == 9 and 0 <= exposure["cleansing"]["after"]["clean_accuracy"] <= 1
    combined = exposure["samples"]["scan"]
    assert combined["detectors"] == ["unlearned", "strip", "ss", "ac"] and 0 <= combined["auroc"] <= 1
    assert combined["flagged"] == combined["flagged_poisoned"] + round(combined["fpr_scanned_clean"] * 51)
    scan = exposure["nc_scan"]
    assert len(scan["norms"]) == 3 and scan["candidate"] == min(range(3), key=scan["norms"].__getitem__)
    assert set(scan["flagged"]) <= {0, 1, 2} and 0 <= scan["success"] <= 1 and scan["seconds"] > 0
    assert scan["iou"] is not None and scan["iou"] <= scan["placed_iou"]  # BadNets' patch
    assert "nc_scan" not in clean["exposure"]
    for heading in ("## What the unlearned model exposes", "| clean seed 1 |", "Backdoored-model detection",
                    "Neural Cleanse's search", "Poisoned-sample detection", "Combined scan (", "Cleansing:",
                    "Trigger recovery guided by the exposure", "| badnets seed 0 | 0 |", "placed IoU",
                    "IoU, any trained placement"):
        assert heading in text
    assert (out / "exposure_scores.png").stat().st_size > 1000


def test_label_runs_of_clean_and_backdoored_subjects(studies):
    out, text, _ = studies["labels"]
    rows = {r["label"]["attack"]: r for r in records(out)}
    assert rows["clean"]["label_runs"]["backdoored"] is False and rows["badnets"]["label_runs"]["true_target"] == 0
    for record in rows.values():
        runs = record["label_runs"]["runs"]
        assert len(runs) == 3 and record["cell"]["label_runs"] == {"runs": 3, "subset": 0.5, "amp": "off"}
        clean_images = len(record["clean_indices"])
        for run in runs:
            assert sum(map(sum, run["confusion"])) == clean_images and len(run["drift_shares"]) == 3
            assert run["candidate"] == max(range(3), key=run["drift_shares"].__getitem__) and run["steps"] >= 1
        assert len({tuple(run["drift_shares"]) for run in runs}) > 1  # other images, other seeds
        verdict = judge(collapse_map([run["confusion"] for run in runs]))
        assert record["label_runs"]["verdict"] == verdict.to_dict()
        assert f"| {verdict.agreement:.2f} | {verdict.kind}" in text
    clean_verdict = rows["clean"]["label_runs"]["verdict"]["kind"]
    badnets_verdict = rows["badnets"]["label_runs"]["verdict"]
    named = badnets_verdict["kind"] == "all-to-one" and badnets_verdict["target"] == 0
    assert (f"Verdicts right, one per subject and clean set: {int(clean_verdict == 'clean')} of 1 on clean models, "
            f"called clean; {int(named)} of 1 on all-to-one backdoors, named with the target.") in text
    assert "## Label over repeated unlearnings" in text and "| badnets seed 0 |" in text


def test_report_only_rerenders_several_grids_after_a_code_change(studies, monkeypatch, capsys):
    paths = [studies[name][2] for name in ("attacks", "exposure")]
    for name in ("attacks", "exposure"):
        (studies[name][0] / "results.md").unlink()
    monkeypatch.setattr(grid_module, "package_fingerprint", lambda: "other-code")  # every key changes
    assert main(["bench", "--report-only", *map(str, paths)]) == 0
    assert "## Attack properties" in (studies["attacks"][0] / "results.md").read_text()
    assert "## What the unlearned model exposes" in (studies["exposure"][0] / "results.md").read_text()
    capsys.readouterr()
    assert main(["bench", "--report-only", "--out", "x", *map(str, paths)]) == 2
    assert "--out names one grid's results folder" in capsys.readouterr().err


def test_an_attack_entry_takes_its_own_rate_and_seeds(data):
    grid = parse_grid(grid_dict(data, attacks=["badnets", {"name": "blend", "poison_rate": 0.2, "seeds": [3, 4]}],
                                seeds=[0]))
    assert [(s.label, s.seed) for s in grid.subjects()] == [("badnets", 0), ("blend@0.2", 3), ("blend@0.2", 4)]
    assert all("poison_rate" not in s.attack_params and "seeds" not in s.attack_params for s in grid.subjects())


def test_a_defense_row_takes_its_own_clean_seeds(data):
    rows = {"none": {}, "ft": FT_FAST, "rnp": {**RNP_FAST, "clean_seeds": [0, 1, 2]}}
    own = parse_grid(grid_dict(data, defenses=rows, retuning=None))
    cells = [(c.name or c.defense, c.clean_seed) for c in own.cells({"tiny": "x"})]
    assert cells == [("none", None), ("ft", None), ("rnp", 0), ("rnp", 1), ("rnp", 2)]
    plain = parse_grid(grid_dict(data, defenses={k: v for k, v in rows.items() if k != "rnp"}, retuning=None))
    assert [c.key for c in plain.cells({"tiny": "x"})] == [c.key for c in own.cells({"tiny": "x"})][:2]


@pytest.mark.parametrize("change, message", [
    ({"clean_seeds": []}, "'clean_seeds' is a non-empty list"),
    ({"defenses": {"rnp": {"clean_seeds": None}}}, "defenses.rnp.clean_seeds is a non-empty list"),
    ({"clean_seeds": ["a"]}, "'clean_seeds' takes integers"),
    ({"repeats": 0}, "'repeats' takes integers >= 1"),
    ({"prune_counts": [0]}, "'prune_counts' takes integers >= 1"),
    ({"prune_counts": [5], "defenses": {"none": {}}}, "'prune_counts' measures RNP's ranking"),
    ({"prune_counts": [5], "curve_images": 0}, "it needs an rnp defense and curve_images > 0"),
    ({"attack_properties": "yes"}, "'attack_properties' takes true or false"),
    ({"cost_floor": "false"}, "'cost_floor' takes true or false"),
    ({"label_runs": {"runs": 0}}, "label_runs: runs takes integers >= 1"),
    ({"label_runs": {"subset": 1.5}}, "label_runs: subset takes a share in \\(0, 1\\]"),
    ({"label_runs": {"amp": "auto"}}, "label_runs: amp takes 'on' or 'off'"),
    ({"label_runs": True, "defenses": {"rnp": {}}}, "add the defense 'none'"),
    ({"attack_properties": True, "defenses": {"rnp": {}}}, "add the defense 'none'"),
    ({"exposure": {"samples": 0}, "retuning": None}, "exposure: samples takes integers >= 1"),
    ({"exposure": {"budget": 3}}, "exposure has no setting budget"),
    ({"exposure": {"cleanse": "no"}}, "exposure.cleanse takes true or false"),
    ({"exposure": {"nc_scan": 1}}, "exposure.nc_scan takes true or false"),
    ({"recalibration": "yes"}, "recalibration"),
    ({"attacks": ["none"]}, "the attack 'none' \\(a clean subject\\) has no backdoor to re-tune"),
    ({"attacks": [{"name": "none", "size": 3}], "exposure": True, "retuning": None}, "takes only 'seeds'"),
    ({"attacks": [{"name": "badnets", "poison_rate": 2}]}, "poisoning rate"),
    ({"attacks": [{"name": "badnets", "seeds": []}]}, "attacks.badnets.seeds is a non-empty list"),
    ({"attacks": [{"name": "badnets", "seed": 1}]}, "seed and target come from the grid's seeds"),
])
def test_study_key_mistakes_are_one_line_errors(data, change, message):
    with pytest.raises(RnpError, match=message) as error:
        parse_grid(grid_dict(data, **change))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("path", sorted(GRIDS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_benchmark_grid_is_valid(path, data):
    """Each grid file parses (its dataset swapped for the tiny one, which is always there) and
    says how to run it."""
    text = path.read_text()
    assert "rnp bench" in text.split("\nname:")[0]
    raw = yaml.safe_load(text)
    grid = parse_grid({**raw, "datasets": {name: str(data) for name in raw["datasets"]}})
    assert grid.subjects() and grid.defenses and grid.output.startswith("benchmarks/results/")


def test_grid_records_describe_only_the_measurements_that_are_on(data):
    plain = parse_grid(grid_dict(data, retuning=None)).cells({"tiny": "sum"})
    assert not {"clean_seed", "repeats", "prune_counts", "attack_properties", "exposure", "cost_floor",
                "label_runs", "recalibration"} & set(
        json.loads(json.dumps(plain[0].describe())))


def test_quiet_grid_shows_no_training_bars(data, tmp_path, capsys):
    grid = write_grid(tmp_path / "quiet.yaml", grid_dict(data, name="quiet", defenses={"none": {}}, retuning=None,
                                                         output=str(tmp_path / "out")))
    assert main(["bench", str(grid), "--cache", str(tmp_path / "models"), "--device", "cpu", "--quiet"]) == 0
    assert "epoch 1/1" not in capsys.readouterr().err


def test_a_run_of_some_rows_or_subjects_reports_the_whole_grid(data, tmp_path):
    grid = write_grid(tmp_path / "part.yaml", grid_dict(data, name="part", defenses={"none": {}, "ft": FT_FAST},
                                                        retuning=None, output=str(tmp_path / "out")))
    base = ["bench", str(grid), "--cache", str(tmp_path / "models"), "--device", "cpu", "--quiet"]
    assert main(base) == 0
    for part in (["--defenses", "none"], ["--subjects", "badnets"]):
        (tmp_path / "out" / "results.md").unlink()
        assert main([*base, *part]) == 0
        assert "| ft |" in (tmp_path / "out" / "results.md").read_text()
