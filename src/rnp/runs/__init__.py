"""Run folders: training a (backdoored) model into one (:func:`train_run`), loading it back with
its data and attack (:func:`load_run`), and the output folders a defense writes.

This layer sits above attacks, defenses and detection because a run folder records all of them;
the low-level files it is made of (atomic writes, JSON, safetensors) are :mod:`rnp.io`'s.
"""

from rnp.runs.folder import Run, load_model, load_run, save_model
from rnp.runs.outputs import prepare_output_dir, write_defense_outputs
from rnp.runs.training import train_run

__all__ = ["Run", "load_model", "load_run", "prepare_output_dir", "save_model", "train_run",
           "write_defense_outputs"]
