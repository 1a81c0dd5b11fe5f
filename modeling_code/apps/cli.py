"""The ``code-seg`` command line.

    code-seg segment IMAGE [IMAGE ...] --classes "cat, sofa, background" --model PATH_OR_ID --output_dir DIR
    code-seg evaluate --model PATH_OR_ID --benchmark voc --data_root data
    code-seg toy-world [--output_dir outputs/toy_world]
    code-seg export onnx --model PATH_OR_ID --output_dir DIR

Each subcommand is one ``_add_<name>_command(subparsers)`` function that declares its arguments and sets
``handler`` (``args -> exit code``); ``COMMANDS`` lists them. Handlers import the heavy modules (torch,
transformers) themselves after the checks that need neither, and the console script enters through
``code_seg_cli``, which defers the package's Auto-class registration: ``code-seg --help`` and argument errors
answer before torch is imported.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

from .allocator import retain_freed_memory
from .flags import ArgumentParser

# Exit codes: 0 success, 1 some inputs failed (the others were processed), 2 unusable arguments or model.
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2
DTYPES = ("float32", "bfloat16")
EXPORT_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the export extra


def _error(command: str, message: str) -> None:
    print(f"code-seg {command}: error: {message}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------------------
# segment
# --------------------------------------------------------------------------------------------------------------
def _add_segment_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment images into any classes named in text",
        description=(
            "Open-vocabulary segmentation at the benchmark protocol. For each image, writes "
            "<name>_overlay.png (colour-coded labels over the image, with a legend), <name>_labels.png "
            "(class ids as pixel values) and <name>.json (class ids, names and pixel fractions)."
        ),
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    parser.add_argument(
        "--classes",
        required=True,
        help='class names separated by commas or line breaks, e.g. "cat, sofa, background"; "background" is '
        "a constant score map (see --bg_thresh), not a text query",
    )
    parser.add_argument("--model", required=True, help="saved CoDe model directory or Hub id")
    parser.add_argument("--output_dir", dest="out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--no_pamr", action="store_true", help="skip the PAMR mask refinement (faster)")
    parser.add_argument(
        "--bg_thresh",
        type=float,
        default=None,
        help="score of the background class (default: the model's, 0.4)",
    )
    parser.add_argument(
        "--max_pixels",
        type=int,
        default=None,
        help="downscale larger images, with a warning (default 4096*4096)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="weights dtype (default float32)")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when present, else the CPU), cpu, cuda, cuda:N or mps (default auto)"
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity in [0, 1] (default 0.5)")
    parser.add_alias("--out", "--output_dir")
    parser.set_defaults(handler=_run_segment)


def _output_stems(images: Sequence[str]) -> list[str]:
    """File stem per image; repeated stems (same name in two folders) get a numeric suffix."""
    stems, used = [], set()
    for image in images:
        stem, number = Path(image).stem or "image", 1
        candidate = stem
        while candidate in used:
            number += 1
            candidate = f"{stem}-{number}"
        used.add(candidate)
        stems.append(candidate)
    return stems


def _label_image(label_map, num_classes: int):
    """Class ids as an 8-bit PNG image, or 16-bit when there are more than 256 classes."""
    from PIL import Image

    return Image.fromarray(label_map.astype("uint8" if num_classes <= 256 else "uint16"))


OUTPUT_SUFFIXES = ("_overlay.png", "_labels.png", ".json")


def _output_files(out: Path, stem: str) -> list[Path]:
    return [out / f"{stem}{suffix}" for suffix in OUTPUT_SUFFIXES]


def check_output_folder(out: Path, files: Sequence[Path]) -> None:
    """Refuse an output folder the run could not write to, before any work: checked, not created.

    Raises:
        OSError: ``out`` is a file, cannot be created or written to, or one of ``files`` is taken by a folder.
    """
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "--output_dir" if existing == out else f"the folder {existing} above --output_dir"
        raise NotADirectoryError(f"{where} is a file, not a folder: {existing}")
    try:  # a real write: permissions, read-only file systems and ACLs all answer here (os.access misses some)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        action = "write to the output folder" if existing == out else f"create the output folder {out} in"
        raise PermissionError(f"cannot {action} {existing}: {error.strerror or error}") from error
    taken = [str(path) for path in files if path.exists() and not path.is_file()]
    if taken:
        raise IsADirectoryError(f"output file names taken by folders (move them away): {', '.join(taken)}")


def _quiet_libraries() -> None:
    """No weight-loading progress bars; library warnings as one line each, not a source line and a caret."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()

    def one_line(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"code-seg: warning: {message} ({category.__name__})", file=file or sys.stderr)

    warnings.showwarning = one_line


def _register_auto_classes() -> None:
    """What ``import modeling_code`` does, which ``code_seg_cli`` deferred while the arguments were parsed."""
    import modeling_code

    modeling_code.register_auto_classes()


def _run_segment(args: argparse.Namespace) -> int:
    stems = _output_stems(args.images)
    try:  # the checks that need no torch first
        if args.bg_thresh is not None and not 0.0 <= args.bg_thresh <= 1.0:
            raise ValueError(
                f"--bg_thresh must be in [0, 1] (scores are probabilities); got {args.bg_thresh}"
            )
        if not 0.0 <= args.alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1]; got {args.alpha}")
        if args.max_pixels is not None and args.max_pixels < 1:
            raise ValueError(f"--max_pixels must be positive; got {args.max_pixels}")
        check_output_folder(args.out, [path for stem in stems for path in _output_files(args.out, stem)])
    except (ValueError, OSError) as err:
        _error("segment", str(err))
        return EXIT_USAGE
    from ..inference import clean_class_names, parse_class_list

    try:
        class_names, _ = clean_class_names(parse_class_list(args.classes))
    except (ValueError, TypeError) as err:
        _error("segment", str(err))
        return EXIT_USAGE
    missing = [image for image in args.images if not Path(image).is_file()]
    for image in missing:
        reason = "is not a file" if Path(image).exists() else "not found"
        _error("segment", f"skipping {image}: image file {reason}")
    if len(missing) == len(args.images):
        _error("segment", "none of the images exists; nothing to do")
        return EXIT_USAGE

    import torch
    from tqdm.auto import tqdm

    from ..image_processing_code import DEFAULT_MAX_PIXELS, InvalidImageError
    from ..predict.loading import resolve_device, resolve_model_source
    from ..predict.segmenter import CoDeSegmenter

    _register_auto_classes()
    _quiet_libraries()
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        _error("segment", f"--device: {err}")
        return EXIT_USAGE
    retain_freed_memory(device)
    try:
        source = resolve_model_source(args.model)
    except (OSError, ValueError) as err:
        _error("segment", f"cannot load the model {args.model!r}: {err}")
        return EXIT_USAGE
    try:
        segmenter = CoDeSegmenter.from_pretrained(
            source,
            dtype=getattr(torch, args.dtype),
            device=device,
            use_pamr=not args.no_pamr,
            background_threshold=args.bg_thresh,
            max_pixels=DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels,
            overlay_alpha=args.alpha,
        )
    except (OSError, ValueError, RuntimeError) as err:
        _error("segment", f"cannot load the model {args.model!r}: {err}")
        return EXIT_USAGE
    vocabulary = segmenter.encode_vocabulary(class_names)

    failed = len(missing)
    todo = [(image, stem) for image, stem in zip(args.images, stems) if image not in missing]
    for image, stem in tqdm(todo, desc="segmenting", unit="image", disable=True if len(todo) < 2 else None):
        try:
            result = segmenter(image, vocabulary)
        except InvalidImageError as err:
            failed += 1
            tqdm.write(f"code-seg segment: error: skipping {image}: {err}", file=sys.stderr)
            continue
        overlay_path, labels_path, json_path = _output_files(args.out, stem)
        args.out.mkdir(parents=True, exist_ok=True)
        result.overlay.save(overlay_path)
        _label_image(result.label_map, len(result.class_names)).save(labels_path)
        summary = {
            "image": str(image),
            **result.to_dict(),
            "background_threshold": segmenter.background_threshold,
            "pamr": segmenter.use_pamr,
            "model": str(args.model),
            "device": str(device),
        }
        json_path.write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tqdm.write(f"{image}: wrote {overlay_path}, {labels_path}, {json_path}")
    if failed:
        _error("segment", f"{failed} of {len(args.images)} images could not be read")
        return EXIT_SOME_FAILED
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------------------
def _add_evaluate_command(subparsers: argparse._SubParsersAction) -> None:
    from ..evaluation.arguments import add_evaluate_arguments

    parser = subparsers.add_parser(
        "evaluate",
        help="mIoU on the open-vocabulary segmentation benchmarks (same as training/evaluate.py)",
        description="Writes results.json, results.md, model_index.yaml and an overlay grid per benchmark.",
    )
    add_evaluate_arguments(parser)
    parser.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from ..evaluation.runner import run_evaluate

    _register_auto_classes()
    _quiet_libraries()
    retain_freed_memory("auto")  # the device run_evaluate's accelerator picks
    try:
        run_evaluate(args)
    except (OSError, ValueError, KeyError) as error:  # names, folders, model files: each says what is wrong
        _error("evaluate", str(error).strip("'\""))
        return EXIT_USAGE
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------------
# toy-world
# --------------------------------------------------------------------------------------------------------------
def _add_toy_world_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "toy-world",
        help="the embedded default end to end on a CPU: world, CLIP, CoDe, evaluation, comparison figure",
        description="Generates the toy world, pretrains its CLIP, trains CoDe and the TCL-only ablation, "
        "evaluates them and the MaskCLIP baseline on the test split, prints the mIoU table and draws "
        "comparison.png (test images: input, ground truth and each model's label map).",
    )
    parser.add_argument("--output_dir", default="outputs/toy_world")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="a miniature run (seconds; for smoke tests)")
    parser.set_defaults(handler=_run_toy_world)


def _run_toy_world(args: argparse.Namespace) -> int:
    import torch

    from ..toy.end_to_end import ToyPipelineSettings, run_toy_world

    _register_auto_classes()

    if args.quick:
        settings = ToyPipelineSettings.quick(args.output_dir)
    else:
        settings = ToyPipelineSettings(output_dir=args.output_dir)
    settings.seed = args.seed
    retain_freed_memory()  # the toy pipeline runs on the CPU
    torch.set_num_threads(args.threads)  # the process's setting: the command line's to make, not the library's
    run_toy_world(settings)
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------------------
def _add_export_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a model for deployment (ONNX: any window size, batch and class count)",
        description="Writes a text graph and an image graph (dynamic batch, window height and width, class "
        "count), the model's config, its processor files and onnx_export.json to --output_dir; each graph is "
        "checked against the torch model once written. Run the export with CoDeSegmenter.from_onnx "
        "(docs/deploy.md). Needs the export extra: pip install 'code-seg[export]'.",
    )
    parser.add_argument("format", choices=("onnx",), help="the export format")
    parser.add_argument("--model", required=True, help="saved CoDe model directory or Hub id")
    parser.add_argument("--output_dir", dest="out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_alias("--out", "--output_dir")
    parser.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    try:  # before torch is imported
        check_output_folder(args.out, [])
    except OSError as err:
        _error("export", str(err))
        return EXIT_USAGE
    missing = [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        _error("export", f"exporting to ONNX needs {', '.join(missing)}: pip install 'code-seg[export]'")
        return EXIT_USAGE
    from ..predict.loading import resolve_model_source
    from ..predict.onnx_runtime import IMAGE_GRAPH_FILE, METADATA_FILE, TEXT_GRAPH_FILE
    from .onnx_export import ExportCheckError, export_onnx_from_pretrained

    _register_auto_classes()
    _quiet_libraries()
    try:
        source = resolve_model_source(args.model)
        metadata = export_onnx_from_pretrained(source, args.out)
    except ImportError as err:
        _error("export", str(err))
        return EXIT_USAGE
    except (OSError, ValueError) as err:
        _error("export", f"cannot export the model {args.model!r}: {err}")
        return EXIT_USAGE
    except ExportCheckError as err:
        _error("export", f"{err} (the graphs are left in {args.out} for inspection)")
        return EXIT_SOME_FAILED
    check = metadata["export_check"]
    print(
        f"wrote {args.out / TEXT_GRAPH_FILE} and {args.out / IMAGE_GRAPH_FILE} (largest difference from torch on "
        f"the example inputs: text {check['text_max_abs_difference']:.1e}, image "
        f"{check['image_max_abs_difference']:.1e}), {args.out / METADATA_FILE}, config and processor files"
    )
    return EXIT_OK


# --------------------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------------------
COMMANDS = (_add_segment_command, _add_evaluate_command, _add_toy_world_command, _add_export_command)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="code-seg", description="CoDe open-vocabulary semantic segmentation (CVPR 2024) on transformers."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``code-seg`` with ``argv`` (default: the process arguments); returns the exit code."""
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
