"""Low-level files rnp reads and writes: atomic outputs, strict JSON, safe weights, CSV and
tables, figures. Run folders, which record attacks and defenses, are :mod:`rnp.runs`."""

from rnp.io.files import atomic_path, read_json, write_json, write_text
from rnp.io.checkpoint import load_checkpoint, load_state_dict, save_checkpoint, save_state_dict

__all__ = ["atomic_path", "read_json", "write_json", "write_text", "load_checkpoint",
           "save_checkpoint", "load_state_dict", "save_state_dict"]
