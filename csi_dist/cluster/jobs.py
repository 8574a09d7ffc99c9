"""The one SLURM job recipe: the preemption notice, the requeue option and the after-step teardown of every batch script.

Three launch paths write a batch script, and all three take these parts from here, so they cannot drift apart:

* ``slurm/train.sbatch``: its recipe blocks (between ``# >>> job recipe: <part>`` and ``# <<< job recipe: <part>``)
  are generated: ``python -m csi_dist.cluster.jobs sbatch --write`` after a change here; tests/test_jobs.py fails
  while the committed file differs from the generated one.
* ``csi_dist.submit`` and the sweep's trial jobs (``csi_dist.tuning.driver``): submitit writes their batch scripts
  from ``submitit_parameters_for_run`` and ``submitit_parameters_for_sweep_trials``.

The recipe:

* **Notice.** SLURM sends ``NOTICE_SIGNAL`` to the batch shell alone (``B:``) ``NOTICE_LEAD_S`` seconds before the
  time limit, and ``--requeue`` lets the job be requeued. The batch shell's trap (also on the SIGTERM of a requeue or
  scancel) only writes the job segment's id (``<job id>.<restart count>``) to ``$CSI_PREEMPT_REQUEST_FILE``; the
  ranks' ``PreemptionWatcher`` (csi_dist/cluster/preemption.py) reads that file besides ``<run dir>/PREEMPT_REQUESTED``,
  checkpoints at the next check step and requeues. The ranks are not signalled themselves: under train.sbatch a
  step's processes are node launchers, not ranks.
* **srun wrapper.** bash runs a trap only once the foreground command has ended, and a batch script runs srun in the
  foreground: the notice would wait for the end of training. So ``srun`` is a function that runs the real one in the
  background and waits for it until it has ended, whatever traps interrupt the wait.
* **Teardown.** After the step, ``python -m csi_dist.cluster.slurm after-step STATUS RUN_DIR`` decides whether a
  failed step (a lost rank) requeues the job (exit codes: csi_dist/core/exit_codes.py ``NOT_REQUEUED_AFTER``); taken
  in the batch shell, where SLURM's SIGTERM to the failing step cannot kill it. After a requeue the shell waits for SLURM to
  end it: exiting first with an error would leave the job FAILED.

A batch script sets three shell variables before the recipe's lines: ``CSI_PYTHON`` (the interpreter),
``CSI_PREEMPT_REQUEST_FILE`` and ``run_dir``. A sweep trial's run directory is chosen inside the job (rank 0 takes a
trial from the study), so its batch shell knows none: its notice goes to ``<sweep dir>/notices/<job>`` (what the
trial's watcher reads through the exported variable), and its teardown calls after-step without a run directory,
which never requeues after a failure: a trial whose job died is the sweep driver's to fail and retry
(csi_dist/tuning/driver.py). Torch-free: the submitting machine needs no torch.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from csi_dist.cluster.preemption import REQUEST_FILE_NAME, REQUEST_FILE_VARIABLE
from csi_dist.core.exit_codes import EXIT_CONFIG_ERROR

# SLURM signals the batch shell this long before the time limit: enough for one checkpoint of a large model.
NOTICE_LEAD_S = 120
NOTICE_SIGNAL = "USR1"
SBATCH_SIGNAL = f"B:{NOTICE_SIGNAL}@{NOTICE_LEAD_S}"
# sbatch options of every job, as submitit's `slurm_additional_parameters` (True = a flag without value)
SBATCH_OPTIONS = {"signal": SBATCH_SIGNAL, "requeue": True}

SBATCH_PATH = Path(__file__).resolve().parents[2] / "slurm" / "train.sbatch"
BLOCK_START, BLOCK_END = "# >>> job recipe: ", "# <<< job recipe: "


def option_lines() -> list[str]:
    """The ``#SBATCH`` lines of the recipe's options, as submitit writes them."""
    return [f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={value}"
            for key, value in SBATCH_OPTIONS.items()]


def notice_lines() -> list[str]:
    """The notice trap and the srun wrapper; needs ``$CSI_PREEMPT_REQUEST_FILE``."""
    return [
        f'mkdir -p "$(dirname "${REQUEST_FILE_VARIABLE}")"',
        "csi_notice() {  # written with this segment's id, so that the next segment can tell a stale request apart",
        '  echo "[csi job $(date +%T)] got SIG$1: asking the ranks to checkpoint and requeue"',
        f'  echo "$SLURM_JOB_ID.${{SLURM_RESTART_COUNT:-0}}" > "${REQUEST_FILE_VARIABLE}"',
        "  csi_noticed=1",
        "}",
        f"trap 'csi_notice {NOTICE_SIGNAL}' {NOTICE_SIGNAL}",
        "trap 'csi_notice TERM' TERM",
        "srun() {  # in the background: bash runs a trap only once the foreground command has ended",
        '  command srun "$@" &',
        "  local pid=$! status",
        "  while :; do  # a trapped signal interrupts `wait`: wait again until srun itself has ended",
        "    csi_noticed=0",
        '    wait "$pid"',
        "    status=$?",
        '    [ "$csi_noticed" = 1 ] && [ "$status" -gt 128 ] && continue',
        '    return "$status"',
        "  done",
        "}",
    ]


def teardown_lines(knows_run_dir: bool = True) -> list[str]:
    """The lines right after the step: its status, the after-step requeue rule, the exit. Need ``$CSI_PYTHON`` and,
    with `knows_run_dir`, ``$run_dir``."""
    run_dir = ' "$run_dir"' if knows_run_dir else ""
    return [
        "status=$?",
        'echo "[csi job $(date +%T)] training exited with status $status"',
        f'if "$CSI_PYTHON" -m csi_dist.cluster.slurm after-step "$status"{run_dir}; then',
        "  sleep 300 &  # SLURM ends this requeued segment itself; exiting first would race the requeue",
        "  wait $!",
        "fi",
        'exit "$status"',
    ]


def _submitit_parameters(variables: list[str], knows_run_dir: bool) -> dict:
    return dict(slurm_signal_delay_s=NOTICE_LEAD_S,  # submitit's own --signal, which SBATCH_OPTIONS replaces
                slurm_additional_parameters=dict(SBATCH_OPTIONS),
                slurm_setup=[f"CSI_PYTHON={shlex.quote(sys.executable)}", *variables, *notice_lines()],
                slurm_teardown=teardown_lines(knows_run_dir))


def submitit_parameters_for_run(run_dir: Path) -> dict:
    """submitit's parameters for a training job whose run directory is fixed at submission (csi_dist.submit)."""
    quoted = shlex.quote(str(Path(run_dir).resolve()))
    return _submitit_parameters([f"run_dir={quoted}", f'export {REQUEST_FILE_VARIABLE}="$run_dir"/{REQUEST_FILE_NAME}'],
                                knows_run_dir=True)


def submitit_parameters_for_sweep_trials(sweep_dir: Path) -> dict:
    """submitit's parameters for a sweep's trial jobs: the notice goes to <sweep dir>/notices/<SLURM job id> (a job
    array element has its own), no failure requeue (the driver retries a trial whose job died)."""
    notices = shlex.quote(str(Path(sweep_dir).resolve() / "notices"))
    return _submitit_parameters([f'export {REQUEST_FILE_VARIABLE}={notices}/"$SLURM_JOB_ID"'], knows_run_dir=False)


def render_sbatch(text: str, source: str = "slurm/train.sbatch") -> str:
    """`text` with each recipe block (options, notice, teardown) replaced by the recipe's current lines."""
    blocks = {"options": option_lines(), "notice": notice_lines(), "teardown": teardown_lines()}
    lines, out, inside = text.splitlines(), [], None
    for number, line in enumerate(lines, 1):
        if inside is None:
            out.append(line)
            if line.startswith(BLOCK_START):
                inside = line[len(BLOCK_START):].split()[0]
                if inside not in blocks:
                    raise ValueError(f"{source}:{number}: unknown job recipe block {inside!r} "
                                     f"(known: {', '.join(blocks)})")
                out.extend(blocks.pop(inside))
        elif line.startswith(BLOCK_END + inside):
            out.append(line)
            inside = None
    if inside is not None:
        raise ValueError(f"{source}: job recipe block {inside!r} has no closing line {BLOCK_END + inside!r}")
    if blocks:
        raise ValueError(f"{source}: no job recipe block for {', '.join(blocks)}")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csi_dist.cluster.jobs", description=__doc__.splitlines()[0])
    actions = parser.add_subparsers(dest="action", required=True)
    sbatch = actions.add_parser("sbatch", help="print slurm/train.sbatch with its job recipe blocks regenerated")
    sbatch.add_argument("--write", action="store_true", help="rewrite the file in place (default: print it)")
    sbatch.add_argument("--path", type=Path, default=SBATCH_PATH, help="default: the repository's slurm/train.sbatch")
    args = parser.parse_args(argv)
    try:
        rendered = render_sbatch(args.path.read_text(encoding="utf-8"), str(args.path))
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.write:
        args.path.write_text(rendered, encoding="utf-8")
    else:
        sys.stdout.write(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
