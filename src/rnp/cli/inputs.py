"""What the commands read: every input path (which no output may replace) and a model given
as a weights file with ``--model``; shared by ``rnp defend``, ``inspect`` and ``scan-data``."""

from __future__ import annotations

from pathlib import Path

from rnp.errors import RnpError
from rnp.io.checkpoint import load_checkpoint, load_state_dict
from rnp.models import build_model, model_spec
from rnp.runs.folder import load_weights, run_inputs


def input_paths(args) -> list[Path]:
    """Every file and folder a command reads (``--model``, ``--data``, ``--poisoned-indices``,
    the run folder's record, its dataset and reference run), for :func:`rnp.runs.outputs.prepare_output_dir`."""
    given = (getattr(args, name, None) for name in ("model", "data", "poisoned_indices"))
    return [Path(path) for path in given if path] + (run_inputs(args.run) if args.run else [])


def outside_model(args, data):
    """The model in ``--model`` and its spec: from ``--arch``/``--width``, else from rnp's metadata."""
    tensors = load_state_dict(args.model)
    num_classes, in_channels = data.train.num_classes, data.train.image_shape[0]
    if args.arch:
        spec = model_spec(args.arch, num_classes=num_classes, width=args.width or 16,
                          in_channels=in_channels)
    else:
        if args.width is not None:
            raise RnpError("--width needs --arch")
        spec = _saved_spec(args.model)
        if spec["num_classes"] != num_classes:
            raise RnpError(f"{args.model} classifies {spec['num_classes']} classes but {args.data} "
                           f"has {num_classes}; give the dataset the model was trained on")
        if spec["in_channels"] != in_channels:
            raise RnpError(f"{args.model} takes {spec['in_channels']}-channel images but {args.data} "
                           f"has {in_channels}-channel images")
    model = build_model(**spec)
    load_weights(model, tensors, args.model)
    return model, spec


def _saved_spec(path) -> dict:
    """The model spec rnp stores in its safetensors metadata, checked (the file is untrusted)."""
    metadata = load_checkpoint(path)[1] if Path(path).suffix == ".safetensors" else {}
    spec = metadata.get("model") if isinstance(metadata, dict) else None
    if not spec:
        raise RnpError(f"{path}: give --arch (and --width) for a model not saved by rnp")
    try:
        return model_spec(**spec)
    except (TypeError, ValueError) as error:
        raise RnpError(f"{path}: the model spec in its metadata is not valid ({error})") from None
