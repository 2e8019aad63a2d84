"""The ``mgfa-ray`` command line.

Subcommands:
  * ``mgfa-ray run JOB.yaml [--smoke]`` — the chained job (:func:`mgfa_ray.pipeline.run_job`).
  * One stage at a time, each reusing what earlier stages left (:func:`mgfa_ray.pipeline.run_job`
    with ``until``): ``mgfa-ray detector train JOB`` (manifest and detector), ``mgfa-ray detector
    eval JOB`` (the trained detector's held-out mAP@0.5 per class, from its ``metrics.json``),
    ``mgfa-ray masks build JOB`` (up to the mask set), ``mgfa-ray search start JOB`` (every stage,
    as ``run``).
  * ``--set KEY=VALUE`` (repeatable) on every command taking a JOB: override any job field by its
    dotted key (``--set detector.epochs=30 --set search.num_samples=4``); the value is parsed as
    YAML and the result validated like the file, so an error names the key.
  * ``mgfa-ray train --config FILE [--seeds N]`` — one trial config, e.g. a search's
    ``best_config.yaml``; with ``--seeds N`` N seeds as trials on Ray, reporting mean ± 95% CI
    (:func:`mgfa_ray.analysis.seeds.run_seeds`).
  * ``mgfa-ray ablation JOB.yaml [--rows …] [--seeds N] [--activations …] [--smoke]`` — Table III:
    rows × seeds × activations with confidence intervals and paired tests
    (:func:`mgfa_ray.analysis.ablation.run_ablation`).
  * ``mgfa-ray cam --checkpoint PATH [--images ID ...] [--split test] [--count 8]`` — class
    activation maps and attention maps of a trained run as PNG files (paper Fig. 4,
    :func:`mgfa_ray.analysis.cam.render_cams`).
  * ``mgfa-ray search resume DIR [--more-trials N] [--errored skip|resume|restart]`` — continue a
    search after its driver died, extend a finished one, then export it
    (:func:`mgfa_ray.search.driver.run_search`); ``mgfa-ray search export DIR`` only exports;
    ``mgfa-ray search status DIR [--json]`` reports a running or finished search without touching
    it (:func:`mgfa_ray.search.status.search_status`); ``mgfa-ray search dashboard DIR`` serves its study
    in optuna-dashboard (the ``dashboard`` extra).
  * ``mgfa-ray masks show SET [--images ID ...] [--split S] [--count 8] [--seed 0]`` — detected
    regions and masks over a sample of photos as PNG files, and the set's summary (paper Fig. 3,
    :func:`mgfa_ray.analysis.mask_view.render_mask_figures`).

Bad input (config, data root, labels, masks) prints one ``error: ...`` line naming the file and field
and exits with status 2; a stage whose output is unusable exits with 1, an interrupted run with 130
(:mod:`mgfa_ray.errors`). ``--debug`` (or ``MGFA_DEBUG=1``) prints the traceback too. Only the
project's own errors (:class:`~mgfa_ray.errors.UserError` and its subclasses) are reported that way;
any other exception (a bug, CUDA out of memory) ends the command with its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import yaml

from mgfa_ray.config import ConfigError, JobConfig, TrainConfig, load_yaml, validate
from mgfa_ray.errors import DiskFullError, InputError, RunInterrupted, UserError, debug_enabled
from mgfa_ray.runtime import configure


def _job_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of every command that takes a job file."""
    p.add_argument("job", type=Path, help="job YAML, e.g. jobs/leafsnap20.yaml")
    p.add_argument("--smoke", action="store_true", help="tiny CI-sized run (3 classes, 1 epoch, 2 trials)")
    p.add_argument("--output-dir", type=Path, default=None, help="override the job's output_dir")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job field by its dotted key, value parsed as YAML (repeatable), "
                        "e.g. --set detector.epochs=30 --set search.num_samples=4")
    p.add_argument("--accept-weak", action="store_true",
                   help="go on when the detector or the mask set fails its stage gate (detector.min_map50, "
                        "masks.max_empty_fraction), with a warning")
    return p


def _parser() -> argparse.ArgumentParser:
    """The ``mgfa-ray`` command line (argparse): every command, its options and their help.

    Length: the whole command tree in one place, one statement per option, so ``--help`` and this
    function read alike.
    """
    p = argparse.ArgumentParser(prog="mgfa-ray", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of an error as well (same as MGFA_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    _job_args(sub.add_parser("run", help="run a job: manifest → detector → masks → search → export"))
    detector = sub.add_parser("detector", help="the region detector stage alone")
    detector_sub = detector.add_subparsers(dest="detector_command", required=True)
    _job_args(detector_sub.add_parser("train", help="manifest and detector (skipped when already trained)"))
    det_eval = _job_args(detector_sub.add_parser(
        "eval", help="the job's trained detector: held-out mAP@0.5 per region class (from its metrics.json)"))
    det_eval.add_argument("--json", action="store_true", help="print the metrics as JSON")
    # Cross-validation (`--folds K`: grouped k-fold mAP@0.5 over all annotated photos) belongs here.
    train = sub.add_parser("train", help="train one config (e.g. export/best_config.yaml)")
    train.add_argument("--config", type=Path, required=True, help="TrainConfig YAML")
    train.add_argument("--output-dir", type=Path, default=None,
                       help="where config, metrics and checkpoint go (default outputs/train/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue from the output dir's checkpoint")
    train.add_argument("--seeds", type=int, default=None, metavar="N",
                       help="train N seeds (config seed, +1, …) as trials on Ray and report mean ± 95%% CI")
    abl = _job_args(sub.add_parser(
        "ablation", help="Table III: ablation rows x seeds x activations, with confidence intervals"))
    abl.add_argument("--rows", nargs="+", default=None, help="rows: backbone, a region class, all (default: the job's)")
    abl.add_argument("--seeds", type=int, default=None, metavar="N", help="seeds per cell (default: the job's, 5)")
    abl.add_argument("--activations", nargs="+", default=None, metavar="ACTIVATION",
                     help="softmax, softmax_scaled, sigmoid (default: the job's)")
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
    search = sub.add_parser("search", help="start, watch, resume, extend or export a search")
    search_sub = search.add_subparsers(dest="search_command", required=True)
    _job_args(search_sub.add_parser("start", help="every stage of a job and its search, then export (as `run`)"))
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
    export.add_argument("--partial", action="store_true",
                        help="export a search that has not finished (marked unfinished in summary.json and "
                             "best_config.yaml) instead of refusing")
    status = search_sub.add_parser("status", help="trials per state, best so far, rungs, epochs and ETA of a "
                                                  "running or finished search (read-only)")
    status.add_argument("dir", help="search directory or URI")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    replay = search_sub.add_parser(
        "replay", help="replay a search's recorded trials under other ASHA settings: what each would stop, keep "
                       "and find (exact where the curves exist)")
    replay.add_argument("dir", help="search directory or URI")
    replay.add_argument("--grace-period", type=int, nargs="+", metavar="E",
                        help="first rungs to try, in epochs (0: no early stopping; default: the search's)")
    replay.add_argument("--reduction-factor", type=int, nargs="+", metavar="F",
                        help="reduction factors to try (default: the search's)")
    replay.add_argument("--brackets", type=int, nargs="+", metavar="B", help="Hyperband brackets to try (default 1)")
    replay.add_argument("--workers", type=int, default=None, help="trials at once (default: the search's max_concurrent)")
    replay.add_argument("--json", action="store_true", help="print the report as JSON")
    dash = search_sub.add_parser("dashboard", help="serve the search's Optuna study in optuna-dashboard "
                                                   "(pip install 'mgfa-ray[dashboard]')")
    dash.add_argument("dir", help="search directory or URI")
    dash.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    dash.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    masks = sub.add_parser("masks", help="the mask set stage alone, and figures of a mask set")
    masks_sub = masks.add_subparsers(dest="masks_command", required=True)
    _job_args(masks_sub.add_parser("build", help="manifest, detector and mask set (each skipped when done)"))
    show = masks_sub.add_parser("show", help="detected regions and masks over a sample of photos, and a summary "
                                             "(paper Fig. 3)")
    show.add_argument("set", help="mask set location: outputs/<job>/masks/<set_id>, or an s3:// URI")
    show.add_argument("--images", nargs="+", default=None, metavar="ID", help="image ids (default: a sample)")
    show.add_argument("--split", default=None, help="sample from this split only (default: all)")
    show.add_argument("--count", type=int, default=8, help="sample size (default 8)")
    show.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    show.add_argument("--manifest", default=None, help="manifest with the photo paths (default: the set's)")
    show.add_argument("--output-dir", type=Path, default=None, help="default: outputs/mask_figures/<set_id>")
    return p


def load_job(path: Path, overrides: Sequence[str] = (), *, output_dir: Path | None = None) -> JobConfig:
    """The job file ``path`` with ``--set KEY=VALUE`` overrides applied, validated as one document.

    Args:
        path: Job YAML.
        overrides: ``KEY=VALUE`` strings: ``KEY`` a dotted field path (``detector.epochs``,
            ``search.warm_start.storage``), ``VALUE`` parsed as YAML (``30`` an int, ``[a, b]`` a
            list, ``null`` None). Later overrides win.
        output_dir: Replaces ``output_dir`` (the ``--output-dir`` option).

    Raises:
        ConfigError: The file is missing or invalid, an override is not ``KEY=VALUE``, its value is
            not YAML, it descends into a field that is not a section, or the result fails validation
            (each message names the key).
    """
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if sep and "[" in key:  # regions.classes[0]=leaf: a list is set whole
            whole = key.split("[", 1)[0]
            raise ConfigError(f"--set {key}: a list item cannot be set alone; give the whole list, e.g. "
                              f"--set '{whole}=[a, b]'")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted field path, e.g. detector.epochs=30")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: the value {text!r} is not valid YAML ({err})") from None
        node, parts = data, key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is a value, not a section with fields")
            node = child
        node[parts[-1]] = value
    if output_dir is not None:
        data["output_dir"] = str(output_dir)
    given = " ".join(f"--set {o}" for o in overrides)
    return validate(JobConfig, data, source=f"{path} with {given}" if overrides else str(path))


def load_train_config(path: Path) -> TrainConfig:
    """The trial config of ``mgfa-ray train --config``; a job file given there is one error saying
    so (not ten lines of missing and unknown fields).

    Raises:
        ConfigError: The file is missing, invalid, or a job file.
    """
    data = load_yaml(path)
    if isinstance(data, dict) and {"dataset", "search"} <= set(data) and "manifest" not in data:
        raise ConfigError(f"{path} is a job file (it has dataset: and search:), not a trial config: run it with "
                          f"`mgfa-ray run {path}`, or give `train --config` a trial config such as a search's "
                          "export/best_config.yaml")
    return validate(TrainConfig, data, source=str(path))


def _default_export_dir(search_dir: str) -> Path:
    from mgfa_ray.search.export import default_export_dir

    return default_export_dir(search_dir)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mgfa-ray`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    configure()  # Ultralytics offline, Optuna's log level (mgfa_ray.runtime)
    if args.debug:
        os.environ["MGFA_DEBUG"] = "1"  # also seen by Ray workers started from here
    try:
        return _dispatch(args)
    except UserError as err:
        return _report(err, err.exit_status)
    except OSError as err:  # a full disk is the user's to mend; any other OSError keeps its traceback
        again = "the same command again with --resume" if args.command == "train" else "the same command again"
        full = DiskFullError.from_os_error(err, again=again)
        if full is None:
            raise
        full.__cause__ = err  # --debug shows where it happened
        return _report(full, full.exit_status)
    except KeyboardInterrupt:  # Ctrl-C outside Ray Tune's own handling (which ends in RunInterrupted)
        return _report(RunInterrupted("interrupted (Ctrl-C); run the same command again to continue where it "
                                      "stopped (`mgfa-ray train`: with --resume)"), RunInterrupted.exit_status)
    # Anything else (a ValueError from a library, CUDA out of memory, ...) is not the user's to
    # mend in one line: it propagates with its traceback.


def _report(err: BaseException, status: int) -> int:
    """Print ``error: <message>`` (after the traceback with ``--debug``/``MGFA_DEBUG=1``); return ``status``."""
    from mgfa_ray.storage import redact_text

    if debug_enabled():
        print(redact_text("".join(traceback.format_exception(err))), file=sys.stderr, end="")
    print(f"error: {redact_text(str(err))}", file=sys.stderr)
    return status


def _dispatch(args: argparse.Namespace) -> int:
    """Run the parsed subcommand; return the exit status."""
    from mgfa_ray.storage import take_credentials

    for name in ("dir", "set", "manifest"):  # locations given on the command line: keys to the environment
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, take_credentials(getattr(args, name), field=name))
    if args.command in ("run", "detector", "masks", "search") and hasattr(args, "job"):
        return _stage_command(args)
    if args.command == "ablation":
        from mgfa_ray.analysis.ablation import run_ablation
        from mgfa_ray.config import to_dict

        job = load_job(args.job, args.overrides, output_dir=args.output_dir)
        given = {k: v for k, v in (("rows", args.rows), ("seeds", args.seeds),
                                   ("activations", args.activations)) if v is not None}
        if given:  # validated as the job's fields, so an error names ablation.<field>
            job = validate(JobConfig, {**to_dict(job), "ablation": {**to_dict(job.ablation), **given}},
                           source=f"{args.job} with the command line's ablation options")
        run_ablation(job, smoke=args.smoke)
    elif args.command == "cam":
        from mgfa_ray.analysis.cam import render_cams

        paths = render_cams(args.checkpoint, out_dir=args.output_dir, image_ids=args.images, split=args.split,
                            count=args.count, manifest=args.manifest, cam_class=args.cam_class,
                            device=args.device)
        print(f"{len(paths)} CAM figures in {paths[0].parent if paths else args.output_dir}")
    elif args.command == "search":
        return _search_command(args)
    elif args.command == "masks":
        from mgfa_ray.analysis.mask_view import render_mask_figures

        paths, summary = render_mask_figures(args.set, out_dir=args.output_dir, image_ids=args.images,
                                             split=args.split, count=args.count, seed=args.seed,
                                             manifest=args.manifest)
        print(json.dumps(summary, indent=2))
        print(f"{len(paths)} figures and summary.json in {paths[0].parent}")
    else:
        from mgfa_ray.train.model import check_weights
        from mgfa_ray.train.trial import train_to_dir

        cfg = load_train_config(args.config)
        cfg = cfg.model_copy(update={"masks": take_credentials(cfg.masks, field=f"{args.config}: masks")})
        check_weights(cfg.backbone, cfg.weights, field=f"{args.config}: weights")  # before any data is read
        out = args.output_dir or Path("outputs") / "train" / args.config.stem
        if args.seeds is not None:
            from mgfa_ray.analysis.seeds import run_seeds

            run_seeds(cfg, name=args.config.stem, seeds=args.seeds, out_dir=out,
                      cache_dir=str((Path("outputs") / "cache").resolve()))
        else:
            train_to_dir(cfg, out, resume=args.resume, cache_dir=Path("outputs") / "cache")
        print(f"outputs in {out}")
    return 0


def _stage_command(args: argparse.Namespace) -> int:
    """``run``, ``detector train|eval``, ``masks build`` and ``search start``: a job up to a stage."""
    from mgfa_ray.pipeline import run_job, smoke_config

    job = load_job(args.job, args.overrides, output_dir=args.output_dir)
    if args.command == "detector" and args.detector_command == "eval":
        return _detector_eval(smoke_config(job) if args.smoke else job, as_json=args.json)
    until = {"detector": "detector", "masks": "masks"}.get(args.command, "search")
    report = run_job(job, smoke=args.smoke, until=until, accept_weak=args.accept_weak)
    if until != "search":
        print(json.dumps(report, indent=2))
    return 0


def _detector_eval(job: JobConfig, *, as_json: bool) -> int:
    """Print the held-out mAP@0.5 per region class of the job's trained detector (its metrics.json)."""
    path = Path(job.output_dir) / "detector" / "metrics.json"
    if job.regions.source != "detector":
        raise ConfigError(f"regions.source is {job.regions.source!r}: job {job.name!r} trains no detector")
    if not path.is_file():
        raise ConfigError(f"{path}: no trained detector for job {job.name!r}; train it with "
                          "`mgfa-ray detector train JOB` (the same --set options)")
    try:
        metrics = json.loads(path.read_text())
        per_class = metrics["per_class"]
    except (ValueError, KeyError) as err:
        raise ConfigError(f"{path}: not a detector metrics file ({err}); rerun `mgfa-ray detector train JOB`") from None
    if as_json:
        print(json.dumps(metrics, indent=2))
        return 0
    differ = [f"{k} {metrics.get(k)!r} (job: {getattr(job.detector, k)!r})" for k in ("model", "imgsz", "epochs", "seed")
              if k in metrics and metrics[k] != getattr(job.detector, k)]
    print(f"detector {metrics.get('detector_key')} ({path.parent / 'weights.pt'}): {metrics.get('model')}, "
          f"imgsz {metrics.get('imgsz')}, {metrics.get('epochs')} epochs; {metrics.get('n_train')} train / "
          f"{metrics.get('n_holdout')} held-out photos")
    print(f"{'class':<16}{'mAP@0.5':>9}{'mAP@0.5:0.95':>14}{'held-out boxes':>16}")

    def num(v):
        return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"

    for name, m in per_class.items():
        print(f"{name:<16}{num(m.get('map50')):>9}{num(m.get('map50_95')):>14}{m.get('n_holdout_instances', ''):>16}")
    print(f"{'all':<16}{num(metrics.get('map50')):>9}{num(metrics.get('map50_95')):>14}")
    if differ:
        print(f"note: trained with other settings than the job's: {', '.join(differ)}; "
              "`mgfa-ray detector train JOB` retrains it")
    return 0


def _search_command(args: argparse.Namespace) -> int:
    """``search resume|export|status|replay|dashboard DIR``."""
    if args.search_command == "status":
        from mgfa_ray.search.status import format_status, search_status

        status = search_status(args.dir)
        print(json.dumps(status, indent=2) if args.json else format_status(status))
        return 0
    if args.search_command == "dashboard":
        return _dashboard(args.dir, host=args.host, port=args.port)
    if args.search_command == "replay":
        from mgfa_ray.search.replay_report import format_replay, replay_search

        try:
            report = replay_search(args.dir, grace_periods=args.grace_period, reduction_factors=args.reduction_factor,
                                   brackets=args.brackets, workers=args.workers)
        except ValueError as err:
            raise InputError(str(err)) from None
        print(json.dumps(report, indent=2) if args.json else format_replay(report))
        return 0
    from mgfa_ray.search.driver import run_search
    from mgfa_ray.search.export import export_search

    if args.search_command == "resume":
        run_search(args.dir, more_trials=args.more_trials, errored=args.errored)
    out = args.output_dir or _default_export_dir(args.dir)
    summary = export_search(args.dir, out, partial=getattr(args, "partial", False))
    print(json.dumps(summary, indent=2))
    if summary.get("unfinished"):
        print(f"warning: {summary['unfinished']}: the best config is the best so far, not the search's result")
    print(f"best config: {Path(out) / 'best_config.yaml'}")
    return 0


def _dashboard(search_dir: str, *, host: str, port: int) -> int:
    """Serve the search's Optuna study with optuna-dashboard until interrupted."""
    try:
        import optuna_dashboard
    except ImportError:
        raise ConfigError("optuna-dashboard is not installed: install the extra, pip install 'mgfa-ray[dashboard]' "
                          "(in a clone: .venv/bin/pip install -e '.[dashboard]')") from None
    from mgfa_ray.search.driver import read_record
    from mgfa_ray.search.status import study_location
    from mgfa_ray.search.study import StudyRef

    record = read_record(search_dir)
    ref = StudyRef(study_location(search_dir, record.study.storage), record.study.study_name)
    ref.load()  # a clear error when the study does not exist yet
    print(f"optuna-dashboard for study {ref.study_name!r} in {ref.storage}: http://{host}:{port}/dashboard "
          "(Ctrl-C stops it)", flush=True)
    optuna_dashboard.run_server(ref.open_storage(), host=host, port=port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
