"""The exit statuses of csi_dist's commands, in one place: what each means and whether SLURM should run it again."""
from __future__ import annotations

EXIT_OK = 0
# a bad config, data, checkpoint or command line: the user has to change something, a rerun would fail the same way
EXIT_CONFIG_ERROR = 2
EXIT_RANK_LOST = 3  # a rank died or stopped answering: the others stopped within training.collective_timeout_s
EXIT_TOO_MANY_BAD_STEPS = 4  # only non-finite steps (callbacks.max_bad_steps in a row)
EXIT_TOO_MANY_BAD_SAMPLES = 5  # more undecodable samples than data.max_bad_sample_fraction allows
# after a preemption checkpoint: 75 is EX_TEMPFAIL from sysexits.h ("try again later"). Inside SLURM the job has been
# requeued by then; outside, rerunning the same command line resumes the run.
EXIT_PREEMPTED = 75

MEANINGS = {EXIT_OK: "finished", EXIT_CONFIG_ERROR: "refused: bad config, data or checkpoint",
            EXIT_RANK_LOST: "stopped: a rank was lost", EXIT_TOO_MANY_BAD_STEPS: "stopped: only non-finite steps",
            EXIT_TOO_MANY_BAD_SAMPLES: "stopped: too many undecodable samples",
            EXIT_PREEMPTED: "stopped by a preemption notice, resumable"}
# A SLURM step that ended with one of these is not requeued after the fact: done, refused, failing the same way
# again, or stopped by a notice and requeued already.
NOT_REQUEUED_AFTER = frozenset({EXIT_OK, EXIT_CONFIG_ERROR, EXIT_TOO_MANY_BAD_STEPS, EXIT_TOO_MANY_BAD_SAMPLES,
                                EXIT_PREEMPTED})


def describe(status: int) -> str:
    """'stopped by a preemption notice, resumable (exit 75)'."""
    return f"{MEANINGS.get(status, 'failed')} (exit {status})"
