"""Evaluate a trained run: `python -m csi_dist.evaluate --run-dir checkpoints/demo [--weights best] [--splits val test]`.

Runs on 1..N processes like training (each rank predicts its share, the predictions are gathered once, padding
dropped) and writes, per split: predictions CSV with FileID, metrics JSON and CSV with a bootstrap interval for every
metric (computed once on the gathered predictions), confusion/ROC/PR figures, the AHF table and a Markdown report,
and once for the run a model card (model_card.md), under `<run_dir>/evaluation/` (or --out). With --by COLUMN, the
metrics per subgroup (evaluation/subgroups.py); on shards other than the training ones, a dataset-shift summary
(evaluation/dataset_shift.py).

Calibration: evaluating the val split of the shards the model was trained on fits one temperature per zone and stores
it beside the weights (`<weights stem>.calibration.json`); every split's report shows calibration before and after
scaling once temperatures exist. `--calibrated` uses the temperature-scaled probabilities for every output (exit 2
when no calibration of these weights exists).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from csi_dist.core.command import run_command
from csi_dist.core.config import Config, ConfigError, load_run_config
from csi_dist.evaluation.subgroups import (DEFAULT_MIN_IMAGES, DEFAULT_MIN_PATIENTS, SubgroupError, SubgroupOptions,
                                           check_shard_columns)
from csi_dist.core.exit_codes import EXIT_CONFIG_ERROR
from csi_dist.core.run_dir import RunDir, evaluation_heatmaps, evaluation_provenance

# torch, the models and the metrics are imported where they are used: `--help`, a usage error and a config error are
# answered before they load (issue 34)

log = logging.getLogger("csi_dist.evaluate")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="csi_dist.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a training run directory (required)")
    parser.add_argument("--weights", default="best", metavar="best|last|PATH",
                        help="the run's best weights, its last ones, or a .safetensors file (default: best; the "
                             "last weights when the run saved no best)")
    parser.add_argument("--splits", nargs="+", default=["val", "test"], metavar="SPLIT",
                        help="the splits of the shards to evaluate (default: val test)")
    parser.add_argument("--shard-dir", help="evaluate on other shards, e.g. an external test set (default: the run's "
                        "own data.shard_dir)")
    parser.add_argument("--out", type=Path, help="where the reports go (default: <run dir>/evaluation; for shards "
                        "the model was not trained on, <run dir>/evaluation/external/<their folder name>, so an "
                        "external validation never overwrites the run's own reports)")
    parser.add_argument("--heatmaps", type=int, default=0, metavar="N",
                        help="Grad-CAM maps of each zone for the first N images of each split (default: 0, none)")
    parser.add_argument("--by", action="append", default=[], metavar="COLUMN",
                        help="metrics per subgroup of this metadata column of the shards (an extra column of the "
                             "label CSV: site, sex, ...), with intervals and a flag where a subgroup does worse than "
                             "the whole split; repeat for several columns (default: none)")
    parser.add_argument("--min-subgroup-images", type=int, default=DEFAULT_MIN_IMAGES, metavar="N",
                        help=f"a subgroup with fewer images is named as too small to estimate "
                             f"(default {DEFAULT_MIN_IMAGES})")
    parser.add_argument("--min-subgroup-patients", type=int, default=DEFAULT_MIN_PATIENTS, metavar="N",
                        help=f"a subgroup with fewer patients is named as too small to estimate "
                             f"(default {DEFAULT_MIN_PATIENTS})")
    parser.add_argument("--bootstrap-resamples", type=int, default=1000, metavar="N",
                        help="bootstrap resamples for the 95%% interval of every metric, resampling patients when the "
                             "shards know them, else images (default: 1000; 0: no intervals)")
    parser.add_argument("--bootstrap-seed", type=int, default=0, metavar="SEED",
                        help="seed of the bootstrap resamples (default: 0)")
    parser.add_argument("--calibrated", action="store_true",
                        help="every output uses the temperature-scaled probabilities fitted on the val split "
                             "(default: off, the raw probabilities; evaluating val fits the temperatures)")
    args = parser.parse_args(argv)
    if args.bootstrap_resamples < 0:
        parser.error(f"--bootstrap-resamples: expected 0 (off) or a positive count, got {args.bootstrap_resamples}")
    return args


def default_out_dir(run_dir: Path, shard_dir: str | Path) -> Path:
    """<run dir>/evaluation for the shards the run was trained on (or when the run records none), else
    <run dir>/evaluation/external/<shard folder name>: the run's own reports and model card stay as they are."""
    from csi_dist.core.provenance import read_provenance, sha256_of
    trained_on = read_provenance(run_dir).get("origin", {}).get("data", {}).get("manifest_sha256")
    own = trained_on is None or trained_on == sha256_of(Path(shard_dir) / "manifest.json")
    return RunDir(run_dir).evaluation if own else RunDir(run_dir).external_evaluation(shard_dir)


def evaluate(config: Config, run_dir: Path, weights: str, splits: list[str], out_dir: Path, heatmaps: int = 0,
             bootstrap_resamples: int = 1000, bootstrap_seed: int = 0,
             subgroups: SubgroupOptions = SubgroupOptions(), calibrated: bool = False) -> dict:
    from csi_dist.cluster.preemption import PreemptionWatcher
    from csi_dist.data.shards.reader import LoaderSettings, build_loader, open_split
    from csi_dist.core.distributed import build_accelerator, configure_logging
    from csi_dist.evaluation.calibration_report import EvaluationCalibration
    from csi_dist.evaluation.dataset_shift import training_shard_dir
    from csi_dist.evaluation.inference import StopRequested, predict_split
    from csi_dist.evaluation.intervals import split_bootstrap
    from csi_dist.evaluation.metrics import compute_metrics
    from csi_dist.evaluation.report import write_evaluation
    from csi_dist.evaluation.trained_model import load_trained_model, weights_path
    from csi_dist.core.files import atomic_write_json
    from csi_dist.model.loss import WeightedCSILoss
    from csi_dist.core.provenance import now_utc, read_provenance, sha256_of

    provenance = read_provenance(run_dir)
    trained_on = provenance.get("origin", {}).get("data", {})
    manifest_sha256 = sha256_of(Path(config.data.shard_dir) / "manifest.json")
    calibration = EvaluationCalibration(weights_path(run_dir, weights), calibrated, config.data.shard_dir,
                                        manifest_sha256, trained_on.get("manifest_sha256") in (None, manifest_sha256))
    accelerator = build_accelerator(config.training)
    configure_logging(accelerator)
    if trained_on.get("manifest_sha256") and trained_on["manifest_sha256"] != manifest_sha256:
        log.warning("the shards in %s are not the ones this model was trained on (%s, manifest sha256 %s): "
                    "fine for an external test set, wrong if you meant the run's own splits", config.data.shard_dir,
                    trained_on.get("shard_dir"), trained_on["manifest_sha256"][:12])
    watcher = PreemptionWatcher(run_dir, check_every_steps=config.callbacks.preemption_check_every_steps)
    watcher.install()
    model, path, channels_last, image_size = load_trained_model(config, run_dir, weights, accelerator)
    criterion = WeightedCSILoss(config.loss.unknown_weight).to(accelerator.device)
    settings = LoaderSettings.from_config(config, image_size, train=False, device=accelerator.device)
    results, evaluated = {}, {}  # rank 0: metrics and predictions per split
    batches_done = 0  # over all splits: the first batch is a check step, then every preemption_check_every_steps
    for split in calibration.order(splits):
        loader = build_loader(open_split(config.data.shard_dir, split), settings, epoch=0,
                              rank=accelerator.process_index, world_size=accelerator.num_processes,
                              pin_memory=accelerator.device.type == "cuda")
        try:
            predictions = predict_split(model, loader, criterion, accelerator, channels_last,
                                        should_stop=lambda batches: watcher.should_stop(batches_done + batches - 1,
                                                                                        accelerator))
        except StopRequested:  # nothing partial is written: the files of a split are all there or not at all
            log.warning("evaluation stopped by a preemption notice during split %s (%s written)", split,
                        ", ".join(results) or "no split")
            watcher.finish_after_checkpoint(accelerator, resumes_from="the start (an evaluation is rerun whole)")
        batches_done += len(loader)
        if not accelerator.is_main_process:
            continue
        if not predictions.file_ids:
            log.warning("split %s is empty: nothing to evaluate", split)
            continue
        predictions, scaled = calibration.apply(out_dir, split, predictions)  # raw or temperature-scaled from here
        metrics = compute_metrics(predictions.zone_probs, predictions.zone_targets, predictions.csi_truth,
                                  predictions.ahf_truth)
        metrics.update(loss=predictions.loss, decode_failures=predictions.decode_failures, **scaled.metrics)
        # once, on rank 0's gathered predictions: the same intervals for any number of processes
        intervals = split_bootstrap(predictions, bootstrap_resamples, bootstrap_seed)
        write_evaluation(out_dir, split, predictions.file_ids, predictions.zone_probs, predictions.zone_targets,
                         predictions.csi_truth, predictions.ahf_truth, metrics, intervals, predictions.patient_ids,
                         scaled.probabilities)
        scaled.append_to_report(out_dir / f"{split}_report.md", intervals and intervals.intervals)
        if subgroups.columns:
            from csi_dist.evaluation.subgroups import write_subgroups
            write_subgroups(out_dir, split, predictions, metrics, subgroups)
        results[split], evaluated[split] = metrics, predictions
        if heatmaps:  # rank 0 alone, on the first images of the split in manifest order
            from csi_dist.evaluation.heatmaps import heatmaps_for_batches  # captum: imported only when asked
            drawn = heatmaps_for_batches(model, build_loader(
                open_split(config.data.shard_dir, split), settings, epoch=0, rank=0, world_size=1),
                heatmaps, evaluation_heatmaps(out_dir, split), accelerator.device)
            log.info("%s: zone heatmaps of %d image(s) in %s", split, len(drawn), evaluation_heatmaps(out_dir, split))
        log.info("%s (%d images, weights %s): f1_weighted %.4f, f1_macro %.4f, csi_mae %.3f, report %s", split,
                 len(predictions.file_ids), path.name, metrics["f1_weighted"], metrics["f1_macro"],
                 metrics["csi_mae"], out_dir / f"{split}_report.md")
    training_dir = training_shard_dir(run_dir, config.data.shard_dir)  # None: these are the training shards
    if training_dir is not None:  # other shards: every rank predicts the training val split, rank 0 compares
        from csi_dist.evaluation.dataset_shift import REFERENCE_SPLIT, write_dataset_shift
        reference = predict_split(model, build_loader(open_split(training_dir, REFERENCE_SPLIT), settings, epoch=0,
                                                      rank=accelerator.process_index,
                                                      world_size=accelerator.num_processes),
                                  criterion, accelerator, channels_last)
        reference = calibration.scaled(reference)  # the probabilities the splits use
        for split, predictions in evaluated.items():
            write_dataset_shift(out_dir, split, config.data.shard_dir, predictions, training_dir, reference)
    if accelerator.is_main_process and results:  # the report says which model, trained on what, saw which data
        atomic_write_json(evaluation_provenance(out_dir), {"run": provenance, "evaluated": {
            "weights": str(path.resolve()), "weights_sha256": sha256_of(path), "shard_dir": str(config.data.shard_dir),
            "manifest_sha256": manifest_sha256, "splits": list(results), "utc": now_utc(),
            **calibration.provenance()}})
        from csi_dist.evaluation.model_card import write_model_card
        write_model_card(out_dir, run_dir)
    accelerator.end_training()
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    subgroups = SubgroupOptions(tuple(dict.fromkeys(args.by)), args.min_subgroup_images, args.min_subgroup_patients,
                                args.bootstrap_resamples, args.bootstrap_seed)
    try:
        config = load_run_config(args.run_dir, [f"data.shard_dir={args.shard_dir}"] if args.shard_dir else [])
        check_shard_columns(config.data.shard_dir, subgroups.columns)
    except (ConfigError, SubgroupError) as error:  # answered before torch loads
        log.error("%s", error)
        return EXIT_CONFIG_ERROR
    from csi_dist.data.shards.reader import ShardError
    from csi_dist.evaluation.calibration import CalibrationError
    from csi_dist.model.factory import ModelError
    from csi_dist.core.weights import CheckpointError
    try:
        evaluate(config, args.run_dir, args.weights, args.splits, args.out or default_out_dir(args.run_dir,
                                                                                              config.data.shard_dir),
                 args.heatmaps, args.bootstrap_resamples, args.bootstrap_seed, subgroups, args.calibrated)
    except (ConfigError, ShardError, ModelError, CheckpointError, CalibrationError) as error:
        log.error("%s", error)
        return EXIT_CONFIG_ERROR
    return 0


if __name__ == "__main__":
    run_command(main)
