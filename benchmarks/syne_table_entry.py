"""The training script syne-tune's ``SimulatorBackend`` runs for one trial of the curve table
(``syne_simulator.py``): it reports the recorded curve of configuration ``--table_config`` from the
JSON ``--curves`` at once, every epoch with the seconds elapsed since the trial started (recorded
set-up + epoch seconds, as :func:`mgfa_ray.search.replay.simulate` spends them), so the simulator,
not this script, places the results on the timeline (syne-tune's tabulated-benchmark protocol)."""

import argparse
import json

from syne_tune import Reporter

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--table_config", required=True)
    parser.add_argument("--curves", required=True)
    args, _ = parser.parse_known_args()
    with open(args.curves) as f:
        curve = json.load(f)[str(args.table_config)]
    report = Reporter()
    elapsed = curve["setup_seconds"]
    for epoch, (value, seconds) in enumerate(zip(curve["values"], curve["epoch_seconds"]), 1):
        elapsed += seconds
        report(training_iteration=epoch, eval_top1=value, elapsed_time=elapsed, table_config=int(args.table_config))
