"""The ``mgfa-ray`` command line.

Subcommands:
  * ``mgfa-ray run JOB.yaml [--smoke]`` — the chained job (:func:`mgfa_ray.pipeline.run_job`).
  * ``mgfa-ray train --config FILE [--seeds N]`` — one trial config, e.g. a search's
    ``best_config.yaml``; with ``--seeds N`` N seeds as trials on Ray, reporting mean ± 95% CI
    (:func:`mgfa_ray.ablation.run_seeds`).
  * ``mgfa-ray ablation JOB.yaml [--rows …] [--seeds N] [--formulations …] [--smoke]`` — Table III:
    rows × seeds × formulations with confidence intervals and paired tests
    (:func:`mgfa_ray.ablation.run_ablation`).
  * ``mgfa-ray cam --checkpoint PATH [--images ID ...] [--split test] [--count 8]`` — class
    activation maps and attention maps of a trained run as PNG files (paper Fig. 4,
    :func:`mgfa_ray.cam.render_cams`).
  * ``mgfa-ray search resume DIR [--more-trials N] [--errored skip|resume|restart]`` — continue a
    search after its driver died, extend a finished one, then export it
    (:func:`mgfa_ray.search.run_search`); ``mgfa-ray search export DIR`` only exports.
  * ``mgfa-ray masks SET [--images ID ...] [--split S] [--count 8] [--seed 0]`` — detected regions
    and masks over a sample of photos as PNG files, and the set's summary (paper Fig. 3,
    :func:`mgfa_ray.mask_view.render_mask_figures`).

Bad input (config, data root, labels, masks) prints one ``error: ...`` line naming the file and field
and exits with status 2; a stage whose output is unusable exits with 1, an interrupted run with 130
(:mod:`mgfa_ray.errors`). ``--debug`` (or ``MGFA_DEBUG=1``) prints the traceback too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from .config import JobConfig, TrainConfig, load_config
from .errors import UserError, debug_enabled


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mgfa-ray", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of an error as well (same as MGFA_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a job: manifest → detector → masks → search → export")
    run.add_argument("job", type=Path, help="job YAML, e.g. jobs/leafsnap20.yaml")
    run.add_argument("--smoke", action="store_true", help="tiny CI-sized run (3 classes, 1 epoch, 2 trials)")
    run.add_argument("--output-dir", type=Path, default=None, help="override the job's output_dir")
    run.add_argument("--accept-weak", action="store_true",
                     help="go on when the detector or the mask set fails its stage gate (detector.min_map50, "
                          "masks.max_empty_fraction), with a warning")
    train = sub.add_parser("train", help="train one config (e.g. export/best_config.yaml)")
    train.add_argument("--config", type=Path, required=True, help="TrainConfig YAML")
    train.add_argument("--output-dir", type=Path, default=None,
                       help="where config, metrics and checkpoint go (default outputs/train/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue from the output dir's checkpoint")
    train.add_argument("--seeds", type=int, default=None, metavar="N",
                       help="train N seeds (config seed, +1, …) as trials on Ray and report mean ± 95%% CI")
    abl = sub.add_parser("ablation", help="Table III: ablation rows x seeds x formulations, with confidence intervals")
    abl.add_argument("job", type=Path, help="job YAML, e.g. jobs/leafsnap20_fewshot.yaml")
    abl.add_argument("--rows", nargs="+", default=None, help="rows: backbone, a region kind, all (default: the job's)")
    abl.add_argument("--seeds", type=int, default=None, metavar="N", help="seeds per cell (default: the job's, 5)")
    abl.add_argument("--formulations", nargs="+", default=None, metavar="ACTIVATION",
                     help="softmax, softmax_scaled, sigmoid (default: the job's)")
    abl.add_argument("--smoke", action="store_true", help="tiny CI-sized run (3 classes, 1 epoch)")
    abl.add_argument("--output-dir", type=Path, default=None, help="override the job's output_dir")
    cam = sub.add_parser("cam", help="class activation maps of a trained run, one PNG per image (paper Fig. 4)")
    cam.add_argument("--checkpoint", type=Path, required=True, help="a run's checkpoint.pt (or its directory)")
    cam.add_argument("--images", nargs="+", default=None, metavar="ID", help="manifest image ids (default: --split)")
    cam.add_argument("--split", default="test", help="split to take images from when --images is not given")
    cam.add_argument("--count", type=int, default=8, help="number of images taken from --split")
    cam.add_argument("--output-dir", type=Path, default=None, help="default: <checkpoint dir>/cam")
    cam.add_argument("--manifest", type=Path, default=None, help="manifest overriding the checkpoint config's")
    cam.add_argument("--cam-class", choices=["predicted", "true"], default="predicted",
                     help="explain the predicted class (default) or the true label")
    cam.add_argument("--device", default="cpu", help="torch device (default cpu)")
    search = sub.add_parser("search", help="resume, extend or export a search")
    search_sub = search.add_subparsers(dest="search_command", required=True)
    resume = search_sub.add_parser("resume", help="continue a search cut short, or extend it; then export")
    resume.add_argument("dir", help="search directory (outputs/<job>/search/<job>) or its object-store URI")
    resume.add_argument("--more-trials", type=int, default=0, metavar="N", help="add N trials in a new run")
    resume.add_argument("--errored", choices=["skip", "resume", "restart"], default="skip",
                        help="trials that errored after their retries: keep them failed (default), run them "
                             "again from their last checkpoint, or from scratch")
    resume.add_argument("--output-dir", type=Path, default=None, help="export directory (default: the job's export/, else <dir>/export)")
    export = search_sub.add_parser("export", help="write best config, best checkpoint, trial tables and plots")
    export.add_argument("dir", help="search directory or URI")
    export.add_argument("--output-dir", type=Path, default=None, help="default <dir>/export")
    masks = sub.add_parser("masks", help="detected regions and masks over a sample of photos, and a summary (paper Fig. 3)")
    masks.add_argument("set", help="mask set location: outputs/<job>/masks/<set_id>, or an s3:// URI")
    masks.add_argument("--images", nargs="+", default=None, metavar="ID", help="image ids (default: a sample)")
    masks.add_argument("--split", default=None, help="sample from this split only (default: all)")
    masks.add_argument("--count", type=int, default=8, help="sample size (default 8)")
    masks.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    masks.add_argument("--manifest", default=None, help="manifest with the photo paths (default: the set's)")
    masks.add_argument("--output-dir", type=Path, default=None, help="default: outputs/mask_figures/<set_id>")
    return p


def _default_export_dir(search_dir: str) -> Path:
    from .io import is_uri, safe_stem
    from .search import read_record

    record = read_record(search_dir)
    if record.export_dir:
        return Path(record.export_dir)
    if is_uri(search_dir):
        return Path("outputs") / "search_exports" / safe_stem(search_dir.split("?")[0].rstrip("/").rsplit("/", 1)[-1])
    return Path(search_dir) / "export"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mgfa-ray`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.debug:
        os.environ["MGFA_DEBUG"] = "1"  # also seen by Ray workers started from here
    try:
        return _dispatch(args)
    except UserError as err:
        return _report(err, err.exit_status)
    # Not yet a UserError: library ValueErrors on bad values, RuntimeError when a stage produced
    # nothing usable (e.g. every trial failed).
    except ValueError as err:
        return _report(err, 2)
    except RuntimeError as err:
        return _report(err, 1)


def _report(err: BaseException, status: int) -> int:
    """Print ``error: <message>`` (after the traceback with ``--debug``/``MGFA_DEBUG=1``); return ``status``."""
    from .io import redact_text

    if debug_enabled():
        print(redact_text("".join(traceback.format_exception(err))), file=sys.stderr, end="")
    print(f"error: {redact_text(str(err))}", file=sys.stderr)
    return status


def _dispatch(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; return the exit status."""
    from .io import take_credentials

    for name in ("dir", "set", "manifest"):  # locations given on the command line: keys to the environment
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, take_credentials(getattr(args, name), field=name))
    if args.command == "run":
        from .pipeline import run_job

        job = load_config(JobConfig, args.job)
        if args.output_dir is not None:
            job = job.model_copy(update={"output_dir": str(args.output_dir)})
        run_job(job, smoke=args.smoke, accept_weak=args.accept_weak)
    elif args.command == "ablation":
        from .ablation import run_ablation
        from .config import to_dict, validate

        job = load_config(JobConfig, args.job)
        if args.output_dir is not None:
            job = job.model_copy(update={"output_dir": str(args.output_dir)})
        given = {k: v for k, v in (("rows", args.rows), ("seeds", args.seeds),
                                   ("formulations", args.formulations)) if v is not None}
        if given:  # validated as the job's fields, so an error names ablation.<field>
            job = validate(JobConfig, {**to_dict(job), "ablation": {**to_dict(job.ablation), **given}},
                           source=f"{args.job} with the command line's ablation options")
        run_ablation(job, smoke=args.smoke)
    elif args.command == "cam":
        from .cam import render_cams

        paths = render_cams(args.checkpoint, out_dir=args.output_dir, image_ids=args.images, split=args.split,
                            count=args.count, manifest=args.manifest, cam_class=args.cam_class,
                            device=args.device)
        print(f"{len(paths)} CAM figures in {paths[0].parent if paths else args.output_dir}")
    elif args.command == "search":
        from .search import export_search, run_search

        if args.search_command == "resume":
            run_search(args.dir, more_trials=args.more_trials, errored=args.errored)
        out = args.output_dir or _default_export_dir(args.dir)
        summary = export_search(args.dir, out)
        print(json.dumps(summary, indent=2))
        print(f"best config: {Path(out) / 'best_config.yaml'}")
    elif args.command == "masks":
        from .mask_view import render_mask_figures

        paths, summary = render_mask_figures(args.set, out_dir=args.output_dir, image_ids=args.images,
                                             split=args.split, count=args.count, seed=args.seed,
                                             manifest=args.manifest)
        print(json.dumps(summary, indent=2))
        print(f"{len(paths)} figures and summary.json in {paths[0].parent}")
    else:
        from .trial import train_to_dir

        from .model import check_weights

        cfg = load_config(TrainConfig, args.config)
        cfg = cfg.model_copy(update={"masks": take_credentials(cfg.masks, field=f"{args.config}: masks")})
        check_weights(cfg.backbone, cfg.weights, field=f"{args.config}: weights")  # before any data is read
        out = args.output_dir or Path("outputs") / "train" / args.config.stem
        if args.seeds is not None:
            from .ablation import run_seeds

            run_seeds(cfg, name=args.config.stem, seeds=args.seeds, out_dir=out,
                      cache_dir=str((Path("outputs") / "cache").resolve()))
        else:
            train_to_dir(cfg, out, resume=args.resume, cache_dir=Path("outputs") / "cache")
        print(f"outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
