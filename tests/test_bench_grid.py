"""``rnp bench``: a grid runs every cell, trains each subject once, resumes after interruption,
recomputes only what changed, and reports CSV, Markdown and figures.

The dataset is 90 training and 30 test 16x16 PNG images (3 classes); models have width 4 and
train for one epoch, so the numbers are meaningless but every path runs.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from rnp.bench import cells as cells_module
from rnp.bench.report import figures
from rnp.bench.executors import LocalExecutor, RayExecutor
from rnp.bench.grid import load_grid, parse_grid
from rnp.bench.runner import grid_cells, run_grid
from rnp.cli.main import main
from rnp.errors import RnpError
from rnp.io.plots import Figure, draw
from rnp.metrics import evaluate_backdoor
from rnp.runs.folder import load_run

from helpers import write_dataset
from test_cli import _environment  # noqa: F401 (autouse fixture: private cache, one thread)

RNP_FAST = {"unlearn_epochs": 2, "recover_epochs": 3, "batch_size": 16, "recover_lr": 2.0}
FT_FAST = {"epochs": 1, "batch_size": 16}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), classes=3, n_train=90, n_test=30)


def grid_dict(data: Path, **overrides) -> dict:
    grid = {"name": "tiny", "datasets": {"tiny": str(data)},
            "models": [{"arch": "preact_resnet18", "width": 4}],
            "train": {"epochs": 1, "batch_size": 16}, "attacks": ["badnets"], "seeds": [0],
            "defenses": {"none": {}, "ft": FT_FAST, "rnp": RNP_FAST}, "clean_size": 20,
            "retuning": {"epochs": [1, 2], "fraction": 0.3, "batch_size": 16}, "curve_images": 10}
    grid.update(overrides)
    return grid


def write_grid(path: Path, grid: dict) -> Path:
    path.write_text(json.dumps(grid))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data):
    """One complete run of the tiny grid: (output folder, model cache, exit code)."""
    root = tmp_path_factory.mktemp("bench")
    grid = write_grid(root / "grid.yaml", grid_dict(data))
    code = main(["bench", str(grid), "--out", str(root / "out"), "--cache", str(root / "models"),
                 "--device", "cpu", "--quiet", "--compare"])
    return root / "out", root / "models", code, grid


def records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]


def test_every_cell_is_recorded_with_what_reruns_it(finished, data):
    out, cache, code, _ = finished
    assert code == 0
    rows = records(out)
    assert sorted(r["label"]["defense"] for r in rows) == ["ft", "none", "rnp"]
    for r in rows:
        assert r["status"] == "ok"
        cell = r["cell"]
        assert cell["data_checksum"] and cell["rnp_version"] and cell["subject"]["seed"] == 0
        assert cell["attack_spec"]["name"] == "badnets" and cell["train_config"]["epochs"] == 1
        assert len(r["clean_indices"]) == 20 and r["environment"]["device"] == "cpu"
        assert r["environment"]["cpu_capability"] and r["environment"]["device_name"]
        assert r["environment"]["bfloat16_instructions"] in ("amx", "avx512_bf16", "none")
        assert r["subject_machine"]["device_name"] == r["environment"]["device_name"]  # trained here too
        assert r["peak_memory_mb"] > 0 and set(r["retuning"]["asr"]) == {"1", "2"}
    by_defense = {r["label"]["defense"]: r for r in rows}
    assert by_defense["rnp"]["cell"]["defense_config"]["recover_epochs"] == 3
    assert by_defense["rnp"]["cell"]["defense_config"]["alpha"] == 0.2  # defaults filled in
    assert by_defense["none"]["after"] == by_defense["none"]["before"]
    assert set(by_defense["none"]["retuning"]["control_asr"]) == {"1", "2"}  # the clean twin, re-tuned
    assert "control_asr" not in by_defense["rnp"]["retuning"]
    assert len(list(cache.iterdir())) == 2  # the subject (trained once for three cells) and its clean twin


def test_record_metrics_are_the_evaluation_of_the_subject(finished):
    out, _, _, _ = finished
    record = next(r for r in records(out) if r["label"]["defense"] == "none")
    run = load_run(record["subject_run"])
    direct = evaluate_backdoor(run.model, run.data.test, run.triggered_test())
    assert record["before"] == direct.to_dict()
    assert {r["subject_weights"] for r in records(out)} == {cells_module._digest(run.model)}  # not the defended


def test_rnp_cell_keeps_masks_and_an_oracle_pruning_curve(finished):
    out, _, _, _ = finished
    rnp = next(r for r in records(out) if r["label"]["defense"] == "rnp")["rnp"]
    assert len(rnp["masks"]) > 0 and all(0 <= m <= 1 for m in rnp["masks"])
    assert rnp["curve"][0]["threshold"] == 0.0 and "oracle" in rnp["curve_kind"]
    pruned = [point["pruned"] for point in rnp["curve"]]
    assert pruned == sorted(pruned) and pruned[-1] > pruned[0]
    assert rnp["floor_seconds"] > 0 and rnp["floor_ratio"] > 0
    selection = rnp["selection"]
    assert selection["rule"] == "auto" and len(selection["channels"]) == rnp["pruned"]
    assert selection["evaluated"]["0"] == selection["clean_accuracy_before"]
    assert selection["evaluated"][str(rnp["pruned"])] == selection["clean_accuracy_after"]


def test_report_files(finished):
    out, _, _, _ = finished
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["defense"] for r in rows] == ["none", "ft", "rnp"]  # the grid file's order
    assert {"ca", "asr", "ra", "der", "seconds", "peak_memory_mb", "retuned_asr_1", "retuned_asr_2"} <= set(rows[0])
    assert float(rows[2]["seconds_over_rnp"]) == pytest.approx(1.0)
    text = (out / "results.md").read_text()
    assert "Means per defense" in text and "ASR after 2 ep." in text and "RNP / floor" in text
    assert "| clean model (re-tuning control) | 1 |" in text
    assert "Published numbers beside ours" in text and "BackdoorBench" in text
    assert "model: ours preact_resnet18 width 4, theirs preact_resnet18 width 64" in text
    assert "| rnp | badnets |" in text and "| ft | badnets |" in text and "[b] official RNP log" in text
    for stem in ("der", "rnp_pruning_curve", "rnp_masks"):
        for suffix in ("png", "svg", "csv"):
            assert (out / f"{stem}.{suffix}").stat().st_size > 100
    with open(out / "der.csv") as handle:
        der = {r["x"]: float(r["y"]) for r in csv.DictReader(handle)}
    assert der == {r["defense"]: 100 * float(r["der"]) for r in rows if r["defense"] != "none"}


def test_report_only_without_matplotlib_writes_the_figure_data_and_says_so(finished, tmp_path, capsys,
                                                                         monkeypatch):
    out, cache, _, grid_path = finished
    copy = tmp_path / "out"
    shutil.copytree(out / "cells", copy / "cells")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    capsys.readouterr()
    code = main(["bench", str(grid_path), "--out", str(copy), "--cache", str(cache), "--report-only"])
    err = capsys.readouterr().err
    assert code == 0 and [line for line in err.splitlines() if "matplotlib" in line] == [
        "note: figures need matplotlib: pip install 'rnp-backdoor[plots]' "
        "(the plotted data is in the .csv beside each figure)"]
    assert {p.name for p in copy.iterdir() if p.is_file()} == {
        "results.csv", "results.md", "der.csv", "rnp_pruning_curve.csv", "rnp_masks.csv"}


def test_the_grid_file_names_the_comparison_the_report_makes(finished, data, tmp_path):
    out, cache, _, _ = finished
    copy = tmp_path / "out"
    shutil.copytree(out / "cells", copy / "cells")
    grid = write_grid(tmp_path / "grid.yaml", grid_dict(data, development=["badnets"], reference="ft"))
    assert main(["bench", str(grid), "--out", str(copy), "--cache", str(cache), "--report-only"]) == 0
    text = (copy / "results.md").read_text()
    assert "Each defense against `ft` on the same cells" in text and "(development: badnets;" in text
    assert "| development | ft | 1 | 1 |" in text and "| development | rnp | 1 | 1 |" in text
    assert "Each defense against `rnp`" in (out / "results.md").read_text()  # the grid without either key


def test_der_figure_has_a_bar_per_defense_spanning_its_seeds_and_a_panel_per_attack():
    def record(attack, defense, seed, der):
        return {"status": "ok", "der": der, "label": {"dataset": "tiny", "model": "m", "attack": attack,
                                                      "defense": defense, "seed": seed}}

    records = [record("badnets", "ft", 0, 0.6), record("badnets", "ft", 1, 0.8), record("badnets", "nad", 0, 0.9),
               record("blend", "ft", 0, 0.5), record("blend", "none", 0, 0.5)]
    (badnets, blend) = figures(records)["der"].panels
    assert [row["x"] for row in badnets.rows()] == ["ft", "nad"]
    ft, nad = badnets.rows()
    assert (ft["y"], ft["y_min"], ft["y_max"], ft["n"]) == (pytest.approx(70.0), 60.0, 80.0, 2)
    assert (nad["y"], nad["y_min"], nad["n"]) == (90.0, None, 1)
    assert badnets.title == "DER per defense: badnets" and [r["x"] for r in blend.rows()] == ["ft"]


def test_pruning_curve_figure_has_a_panel_per_subject_and_row_with_a_line_per_clean_set():
    def record(attack, defense, clean_seed, asr):
        curve = [{"threshold": t, "attack_success_rate": asr * (1 - t), "clean_accuracy": 0.9} for t in (0.0, 0.5)]
        label = {"dataset": "tiny", "model": "m", "attack": attack, "defense": defense, "seed": 0}
        if clean_seed is not None:
            label["clean_seed"] = clean_seed
        return {"status": "ok", "der": 0.9, "label": label, "cell": {"defense": "rnp"},
                "rnp": {"curve": curve, "masks": [0.1, 0.9]}}

    records = [record("badnets", "rnp", 0, 1.0), record("badnets", "rnp", 1, 0.5),
               record("badnets", "rnp (paper)", 0, 0.2), record("blend", "rnp", None, 0.8)]
    rnp, paper, blend = figures(records)["rnp_pruning_curve"].panels
    assert (rnp.title, paper.title, blend.title) == ("badnets, defense rnp", "badnets, defense rnp (paper)",
                                                     "blend, defense rnp")
    assert list(rnp.ys) == ["ASR, clean set 0", "ASR, clean set 1", "CA, clean set 0", "CA, clean set 1"]
    assert rnp.ys["ASR, clean set 1"].tolist() == [50.0, 25.0] and rnp.xs["CA, clean set 0"].tolist() == [0.0, 0.5]
    assert rnp.groups["ASR, clean set 1"] == rnp.groups["CA, clean set 1"] != rnp.groups["CA, clean set 0"]
    assert list(blend.ys) == ["ASR", "CA"]


def test_mask_figure_has_a_panel_per_subject_a_histogram_per_row_pooling_its_clean_sets_one_per_same_masks():
    def record(attack, defense, clean_seed, masks):
        label = {"dataset": "tiny", "model": "m", "attack": attack, "defense": defense, "seed": 0,
                 "clean_seed": clean_seed}
        return {"status": "ok", "der": 0.9, "label": label, "cell": {"defense": "rnp"}, "rnp": {"masks": masks}}

    records = [record("badnets", "rnp", 0, [0.0, 1.0]), record("badnets", "rnp", 1, [0.5]),
               record("badnets", "rnp (paper)", 0, [0.2, 0.3]), record("blend", "rnp", 0, [0.9]),
               record("badnets", "rnp (margin)", 0, [0.0, 1.0]), record("badnets", "rnp (margin)", 1, [0.5]),
               record("blend", "rnp (margin)", 0, [0.8])]
    badnets, blend = figures(records)["rnp_masks"].panels
    assert (badnets.title, blend.title) == ("RNP mask values: badnets", "RNP mask values: blend")
    assert list(badnets.data) == ["rnp = rnp (margin) (2 runs)", "rnp (paper)"]  # the same masks: one line
    assert badnets.data["rnp = rnp (margin) (2 runs)"].tolist() == [0.0, 1.0, 0.5]
    assert badnets.data["rnp (paper)"].tolist() == pytest.approx([0.2, 0.3])
    assert list(blend.data) == ["rnp", "rnp (margin)"] and badnets.log_density and blend.log_density
    alone, = figures([record("sig", "rnp", 0, [0.4]), record("sig", "rnp (margin)", 0, [0.4])])["rnp_masks"].panels
    legend = draw(Figure([alone])).axes[0].get_legend()  # the only histogram still says which rows it is
    assert [t.get_text() for t in legend.get_texts()] == ["rnp = rnp (margin) (n=1)"]


def test_second_run_reuses_everything_and_a_changed_setting_recomputes_only_its_cell(finished, data,
                                                                                    tmp_path, monkeypatch):
    out, cache, _, grid_path = finished
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    trained = []
    monkeypatch.setattr("rnp.runs.training.train", lambda *a, **k: trained.append(1) or [])
    grid = parse_grid(grid_dict(data))
    again = run_grid(grid, out, cache=cache, log=lambda line: None)
    assert again.computed == [] and len(again.records) == 3 and not trained
    changed = parse_grid(grid_dict(data, defenses={"none": {}, "ft": {**FT_FAST, "lr": 0.02}, "rnp": RNP_FAST}))
    third = run_grid(changed, out, cache=cache, log=lambda line: None)
    assert len(third.computed) == 1 and not trained  # the subject came from the cache
    assert [r["label"]["defense"] for r in third.records if r["key"] in third.computed] == ["ft"]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")
            if p.name in before} == before  # finished records are never rewritten


def test_an_interrupted_run_keeps_finished_cells_and_no_partial_record(finished, data, tmp_path, monkeypatch):
    out, cache, _, _ = finished
    fresh = tmp_path / "out"
    real = cells_module._defend

    def stop_at_rnp(cell, model, clean):
        if cell.defense == "rnp":
            raise KeyboardInterrupt
        return real(cell, model, clean)

    monkeypatch.setattr(cells_module, "_defend", stop_at_rnp)
    with pytest.raises(KeyboardInterrupt):
        run_grid(parse_grid(grid_dict(data)), fresh, cache=cache, log=lambda line: None)
    names = sorted(p.name for p in (fresh / "cells").iterdir())
    assert len(names) == 2 and all(n.endswith(".json") for n in names)  # no temporary file left
    monkeypatch.setattr(cells_module, "_defend", real)
    resumed = run_grid(parse_grid(grid_dict(data)), fresh, cache=cache, log=lambda line: None)
    assert len(resumed.computed) == 1 and len(resumed.records) == 3


def test_a_defense_that_does_not_apply_is_a_finished_cell(data, tmp_path):
    grid = parse_grid(grid_dict(data, models=[{"arch": "vgg16", "width": 4}], defenses={"clp": {}},
                                retuning=None))
    result = run_grid(grid, tmp_path / "out", cache=tmp_path / "models", log=lambda line: None)
    assert result.records[0]["status"] == "not_applicable" and "BatchNorm" in result.records[0]["error"]


@pytest.mark.parametrize("change, message", [
    ({"defenses": {"rnp": {"no_such": 1}}}, "no setting 'no_such'"),
    ({"defenses": {"magic": {}}}, "unknown defense 'magic'"),
    ({"attacks": ["nope"]}, "unknown attack 'nope'"),
    ({"poison_rates": [1.5]}, "poisoning rate"),
    ({"train": {"seed": 3}}, "'train' takes no seed"),
    ({"models": [{"arch": "resnet18", "depth": 3}]}, "a model is"),
    ({"retuning": {"epochs": [0]}}, "retuning epochs"),
    ({"colour": "red"}, "unknown grid key"),
    ({"clean_size": 0}, "'clean_size' takes integers >= 1, got 0"),
    ({"train": {"epochs": "ten"}}, "train.epochs takes an integer, got 'ten'"),
    ({"train": {"epochs": 0}}, "train: epochs"),
    ({"train": {"augment": "no"}}, "train.augment takes true or false"),
    ({"train": {"lr": True}}, "train.lr takes a number"),
    ({"reduced_attacks": "false"}, "'reduced_attacks' takes true or false \\(unquoted\\), got 'false'"),
    ({"datasets": {"tiny": "no/such/data"}}, "datasets.tiny: no such file or folder"),
    ({"datasets": {"tiny": 3}}, "'datasets.tiny' takes a non-empty string"),
    ({"models": [{"arch": "preact_resnet18", "width": 0}]}, "'models\\[\\].width' takes integers >= 1"),
    ({"attacks": [{"name": "badnets", "size": "4"}]}, "attacks.badnets.size takes an integer"),
    ({"defenses": {"rnp": {"unlearn_epochs": "2"}}}, "defenses.rnp.unlearn_epochs takes an integer"),
    ({"retuning": {"epochs": ["one"]}}, "retuning.epochs takes a list of integers, got \\['one'\\]"),
    ({"curve_images": -1}, "'curve_images' takes integers >= 0"),
    ({"seeds": [0.5]}, "'seeds' takes integers"),
    ({"name": ["x"]}, "'name' takes a non-empty string"),
    ({"output": 7}, "'output' takes a non-empty string"),
    ({"development": ["blend"]}, "development names attacks the grid does not have: blend; its attacks: badnets"),
    ({"development": "badnets"}, "'development' must be a list"),
    ({"reference": "rpn"}, "reference 'rpn' is not a defense row of the grid \\(the comparison needs one\\); "
                           "its rows: ft, rnp"),
    ({"reference": "none"}, "reference 'none' is not a defense row"),
    ({"development": ["badnets"], "defenses": {"none": {}, "ft": FT_FAST}}, "reference 'rnp' is not a defense row"),
])
def test_grid_mistakes_are_one_line_errors(data, change, message):
    with pytest.raises(RnpError, match=message) as error:
        parse_grid(grid_dict(data, **change))
    assert "\n" not in str(error.value)


def test_grid_values_of_the_right_types_are_kept(data, tmp_path):
    grid = parse_grid(grid_dict(data, reduced_attacks=False, train={"epochs": 1, "lr": 1, "milestones": [1]},
                                attacks=[{"name": "badnets", "size": 2}], output=str(tmp_path / "o")))
    assert grid.reduced_attacks is False and grid.train["lr"] == 1 and grid.attacks == [("badnets", {"size": 2})]
    assert grid.output == str(tmp_path / "o")
    attacks = ["badnets", {"name": "badnets", "mode": "all2all"}]
    compared = parse_grid(grid_dict(data, attacks=attacks, development=["badnets,mode=all2all"], reference="ft"))
    assert compared.development == ("badnets,mode=all2all",) and compared.reference == "ft"
    assert parse_grid(grid_dict(data, defenses={"none": {}, "ft": FT_FAST})).reference == "rnp"  # absent: no table
    plain = parse_grid(grid_dict(data, attacks=attacks))
    assert [c.key for c in compared.cells({"tiny": "sum"})] == [c.key for c in plain.cells({"tiny": "sum"})]


def test_a_grid_file_is_checked_whole_before_any_work(data, tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text(f"datasets: {{tiny: {data}}}\nattacks: [badnets]\ndefenses: [none]\n"
                    f"reduced_attacks: 'false'\ncache: {path}\n")
    assert main(["bench", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "reduced_attacks" in err and not (tmp_path / "out").exists()
    path.write_text(path.read_text().replace("'false'", "false"))
    with pytest.raises(RnpError, match=f"{path}: 'cache' names a folder, but {path} is a file"):
        load_grid(path)


def test_bench_cli_reports_a_bad_grid_file_on_one_line(tmp_path, capsys):
    path = tmp_path / "grid.yaml"
    path.write_text("datasets: [unclosed\n")
    assert main(["bench", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rnp: error:") and "not valid YAML" in err and err.count("\n") == 1


def test_cells_expand_over_every_axis_and_keys_follow_settings(data):
    grid = parse_grid(grid_dict(data, attacks=["badnets", {"name": "blend", "alpha": 0.2}],
                                poison_rates=["default", 0.05], seeds=[0, 1]))
    cells = grid.cells({"tiny": "abc"})
    assert len(cells) == 2 * 2 * 2 * 3 and len({c.key for c in cells}) == len(cells)
    assert {c.subject.label for c in cells} == {"badnets", "badnets@0.05", "blend,alpha=0.2", "blend,alpha=0.2@0.05"}
    rnp = [c for c in cells if c.defense == "rnp"]
    assert {c.settings["seed"] for c in rnp} == {0, 1}  # the grid's seed reaches the defense
    moved = grid.cells({"tiny": "abc"})
    assert [c.key for c in moved] == [c.key for c in cells]
    other_data = grid.cells({"tiny": "def"})
    assert not {c.key for c in other_data} & {c.key for c in cells}


def test_one_defense_under_several_settings_is_several_named_rows(data):
    grid = parse_grid(grid_dict(data, defenses={"rnp": RNP_FAST, "rnp (paper)": {"defense": "rnp", **RNP_FAST,
                                                                                 "ranking": "masks",
                                                                                 "prune_rule": "threshold"}}))
    plain, paper = grid.cells({"tiny": "abc"})
    assert (plain.defense, plain.name, paper.defense, paper.name) == ("rnp", "rnp", "rnp", "rnp (paper)")
    assert paper.settings["prune_rule"] == "threshold" and plain.key != paper.key
    with pytest.raises(RnpError, match="unknown defense 'rpn'"):
        parse_grid(grid_dict(data, defenses={"mine": {"defense": "rpn"}}))


def test_ray_executor_gathers_the_same_records(finished, data, tmp_path):
    ray = pytest.importorskip("ray")
    out, cache, _, _ = finished
    grid = parse_grid(grid_dict(data))
    keys = {cell.key for cell in grid_cells(grid)}  # other tests add cells of changed grids to out
    local = {r["label"]["defense"]: r for r in records(out) if r["key"] in keys}
    result = run_grid(grid, tmp_path / "out", cache=cache, executor="ray",
                      threads=1, log=lambda line: None)
    assert not ray.is_initialized()  # the executor stops the local instance it started
    assert len(result.computed) == 3 and not result.failures
    for record in result.records:
        same = local[record["label"]["defense"]]
        assert record["key"] == same["key"]
        assert record["after"] == same["after"] and record["retuning"] == same["retuning"]
    torch.set_num_threads(1)


@pytest.mark.parametrize("executor", ["local", "ray"])
def test_executors_fail_only_the_cells_of_a_failed_subject(data, executor):
    if executor == "ray":
        pytest.importorskip("ray")

    def prepare_all_but_blend(subject):  # local, so Ray ships it by value, not by module name
        """A stand-in for training: blend's subject fails with an input error."""
        if subject.attack == "blend":
            raise RnpError("cannot train blend here")
        return f"dir-{subject.attack}"

    def describe_call(cell, run_dir, control_dir=None):
        return {"defense": cell.defense, "run_dir": run_dir, "control": control_dir}

    grid = parse_grid(grid_dict(data, attacks=["badnets", "blend"], defenses={"none": {}, "ft": FT_FAST}))
    runner = LocalExecutor() if executor == "local" else RayExecutor(cpus=1)
    outcomes = {(c.subject.attack, c.defense): outcome
                for c, outcome in runner.run(grid.cells({"tiny": "x"}), prepare_all_but_blend, describe_call)}
    assert len(outcomes) == 4
    for defense in ("none", "ft"):
        assert isinstance(outcomes[("blend", defense)], RnpError)
        assert str(outcomes[("blend", defense)]) == "cannot train blend here"
    assert outcomes[("badnets", "none")] == {"defense": "none", "run_dir": "dir-badnets", "control": "dir-none"}
    assert outcomes[("badnets", "ft")] == {"defense": "ft", "run_dir": "dir-badnets", "control": None}

