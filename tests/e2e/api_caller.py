"""A caller of the library API, as a user's script: ``fl_server.run`` with a callback that stops
the run after round ``--stop-after`` with status ``pruned``; prints what it saw as JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys

from fl_server import run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stop-after", type=int, required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    seen: list[dict] = []

    def prune(record: dict) -> str | None:
        seen.append({"round": record["round"], "map50_95": record["map50_95"]})
        return "pruned" if record["round"] >= args.stop_after else None

    pythonpath = os.environ.get("PYTHONPATH")
    summary = run(args.overrides, callbacks=[prune])
    json.dump(
        {
            "status": summary.status,
            "rounds_completed": summary.rounds_completed,
            "run_dir": str(summary.run_dir),
            "best_round": summary.best.round if summary.best else None,
            "seen": seen,
            # the engine leaves this process's environment as it found it (Ray exports sys.path)
            "pythonpath_kept": os.environ.get("PYTHONPATH") == pythonpath,
        },
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
