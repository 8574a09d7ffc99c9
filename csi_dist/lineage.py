"""Where a trained model came from: `python -m csi_dist.lineage RUN_DIR` prints its lineage and its metrics.

The origin (git commit and whether the tree was dirty, package versions and the lock file's hash, the data
manifest's and split file's hashes, the resolved config's hash, the seed), what changed on a resume, every job
segment (SLURM job and array ids, requeue count, nodes, devices, the strategy and sharding that really ran, start
and end, the steps it took, how it ended), and the best and last validation metrics. Torch-free.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from csi_dist.core.exit_codes import EXIT_CONFIG_ERROR
from csi_dist.core.provenance import PROVENANCE_NAME, read_provenance
from csi_dist.core.run_dir import RunDir


def strategy_text(strategy: dict | None) -> str:
    """What a segment really ran, e.g. `deepspeed ZeRO-3: 17 of 17 parameter(s) sharded, 2 partition(s)` (the
    partitions of the optimizer state under ZeRO-1/2, of the parameters under FSDP2 and ZeRO-3)."""
    if not strategy:
        return "strategy not recorded"
    stage = strategy.get("zero_stage")
    return (f"{strategy.get('name')}{'' if stage is None else f' ZeRO-{stage}'}: {strategy.get('sharded_parameters')} "
            f"of {strategy.get('parameters')} parameter(s) sharded, {strategy.get('shards')} partition(s)")


def lineage_lines(provenance: dict) -> list[str]:
    origin = provenance.get("origin", {})
    code, environment, data = origin.get("code", {}), origin.get("environment", {}), origin.get("data", {})
    packages = ", ".join(f"{name} {version}" for name, version in environment.get("packages", {}).items() if version)
    lines = [f"code: commit {code.get('commit') or 'unknown (not a git checkout)'}"
             + (" (uncommitted changes)" if code.get("dirty") else ""),
             f"environment: python {environment.get('python')}; {packages}",
             f"lock file sha256: {environment.get('lock_file_sha256')}",
             f"data: {data.get('shard_dir')} (manifest sha256 {data.get('manifest_sha256')}, split file sha256 "
             f"{data.get('split_file_sha256')})",
             f"config sha256: {origin.get('config_sha256')}; seed {origin.get('seed')}"]
    for change in provenance.get("origin_changes", []):
        lines.append(f"changed at segment {change['segment'] + 1}: " + "; ".join(change["changes"]))
    segments = provenance.get("segments", [])
    lines.append(f"{len(segments)} job segment(s):")
    for number, segment in enumerate(segments, start=1):
        job = segment.get("slurm_job_id")
        array = (f" (array {segment['slurm_array_job_id']}_{segment['slurm_array_task_id']})"
                 if segment.get("slurm_array_job_id") else "")
        where = f"SLURM job {job}{array}, restart {segment.get('slurm_restart_count')}" if job else "no SLURM job"
        lines.append(f"  {number}. {where}; {segment.get('world_size')} process(es) on {segment.get('nodes')} "
                     f"({', '.join(segment.get('devices', []))}); {strategy_text(segment.get('strategy'))}; "
                     f"{segment.get('started_utc')} -> "
                     f"{segment.get('ended_utc') or '?'}; steps {segment.get('start_step')} -> "
                     f"{segment.get('end_step')}; {segment.get('outcome')}")
    return lines


def metric_lines(run_dir: Path) -> list[str]:
    path = RunDir(run_dir).history
    if not path.is_file():
        return [f"no validation yet (no {path.name})"]
    history = json.loads(path.read_text(encoding="utf-8"))
    if not history:
        return ["no validation yet"]
    def summary(record: dict) -> str:
        keys = ("val_loss", "val_f1_weighted", "val_f1_macro", "val_csi_mae")
        values = ", ".join(f"{key} {record[key]:.4f}" for key in keys if isinstance(record.get(key), (int, float)))
        return f"epoch {record.get('epoch')} (step {record.get('global_step')}): {values}"
    best = min(history, key=lambda record: record["val_loss"] if record.get("val_loss") is not None else float("inf"))
    return [f"last validation: {summary(history[-1])}", f"lowest val_loss: {summary(best)}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csi_dist.lineage", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a training run directory")
    parser.add_argument("--json", action="store_true",
                        help=f"print the run's {PROVENANCE_NAME} as it is (default: off, a readable summary)")
    args = parser.parse_args(argv)
    provenance = read_provenance(args.run_dir)
    if not provenance:
        print(f"{args.run_dir}: no {PROVENANCE_NAME} (not a csi_dist run directory, or one trained before it "
              f"was recorded)", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.json:
        print(json.dumps(provenance, indent=2))
        return 0
    print("\n".join([f"run {args.run_dir}", *lineage_lines(provenance), *metric_lines(args.run_dir)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
