"""The report's sections, rendered from hand-made records."""

from rnp.bench.report import compare_table
from rnp.bench.sections import clean_set_tables, subjects_table


def record(attack, defense, clean_seed, asr, ca_after=0.85, seed=0):
    label = {"dataset": "tiny", "model": "m", "attack": attack, "defense": defense, "seed": seed}
    if clean_seed is not None:
        label["clean_seed"] = clean_seed
    return {"status": "ok", "label": label, "before": {"clean_accuracy": 0.9, "attack_success_rate": 1.0},
            "after": {"clean_accuracy": ca_after, "attack_success_rate": asr}}


def test_each_clean_set_shows_the_set_a_mean_would_hide():
    records = [record("badnets", "rnp", 0, 0.01), record("badnets", "rnp", 1, 0.995, ca_after=0.88),
               record("badnets", "rnp", 2, 0.0), record("badnets", "ft", None, 0.2),
               record("badnets", "rnp (paper)", 0, 0.5),
               record("blend", "rnp", 2, 0.03), record("blend", "rnp", 0, 0.02)]
    text = clean_set_tables(records)
    assert text.startswith("## Each clean set") and "(clean sets 0 / 1 / 2 unless" in text
    assert "| attack | rnp |\n" in text and "ft |" not in text and "paper" not in text
    assert "| badnets | 1.0 / 99.5 / 0.0 |" in text and "| badnets | 5.0 / 2.0 / 5.0 |" in text
    assert "| blend | 2.0 / 3.0 (sets 0, 2) |" in text


def test_each_clean_set_names_subject_seeds_and_is_absent_without_several_sets():
    records = [record("badnets", "rnp", c, 0.01 * c, seed=s) for s in (0, 1) for c in (0, 1)]
    text = clean_set_tables(records)
    assert "| badnets seed 0 | 0.0 / 1.0 |" in text and "| badnets seed 1 | 0.0 / 1.0 |" in text
    assert clean_set_tables([record("badnets", "rnp", 0, 0.01), record("badnets", "ft", None, 0.2),
                             record("badnets", "none", 0, 1.0), record("badnets", "none", 1, 1.0)]) == ""


def test_subjects_show_what_training_cost_where_the_records_keep_it():
    costed = {**record("badnets", "none", None, 1.0), "subject_training": {"seconds": 9000.0, "cpu_seconds": 7200.0},
              "subject_machine": {"device_name": "AMD EPYC", "threads": 1}}
    older = record("blend", "none", None, 1.0)
    two = {**record("sig", "none", None, 1.0), "subject_training": {"seconds": 3600.0, "cpu_seconds": None},
           "subject_machine": {"device_name": "AMD EPYC", "threads": 2}}
    text = subjects_table([record("badnets", "rnp", 0, 0.01), costed, older, two])
    assert text.startswith("## Subjects")
    assert "| tiny | m | badnets | 0 | 90.0 | 100.0 | 2.50 | 2.00 | AMD EPYC, 1 thread |" in text
    assert "| tiny | m | blend | 0 | 90.0 | 100.0 | - | - | - |" in text
    assert "| tiny | m | sig | 0 | 90.0 | 100.0 | 1.00 | - | AMD EPYC, 2 threads |" in text
    assert subjects_table([older]) == ""


def test_published_numbers_are_compared_with_the_attack_at_its_own_parameters_only():
    def cell(defense, asr, params):
        r = record("badnets", defense, None, asr)
        r["after"]["clean_accuracy_non_target"] = 0.85
        subject = {"attack": "badnets", "attack_params": params, "arch": "preact_resnet18", "width": 32}
        r["cell"] = {"subject": subject, "attack_spec": {"poison_rate": 0.1}, "train_config": {"epochs": 45},
                     "clean_size": 500}
        return r

    text = compare_table([cell("rnp", 0.01, {}), cell("rnp", 0.9, {"mode": "all2all"})])
    assert "| rnp | badnets | 85.0 / 1.0 |" in text and "45.5" not in text
