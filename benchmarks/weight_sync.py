"""In-place weight sync vs engine restart: the same OPD run, both ways, on one config.

Runs ``opd run CONFIG --set opd.weight_sync=inplace`` and ``=restart`` (same seed, same home, so the
cached teacher is shared), or summarises two finished run dirs (``--from-runs``). Prints a table and
writes JSON: final accuracy and reverse KL of each, per-round reverse KL, and the OPD phase's
seconds (sample / score / update / sync), whose ratio is the claim. Runs are sequential; on a
shared machine say so, since the restart side is the longer one.

    python benchmarks/weight_sync.py --config configs/demo.yaml --home .opd     # ~60 min on 2 CPU cores
    python benchmarks/weight_sync.py --from-runs .opd/runs/KEY_A .opd/runs/KEY_B
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

from opd.records import RoundMetrics, RunLayout, read_done

ROOT = Path(__file__).resolve().parents[1]
PHASES = RoundMetrics.TIMINGS


def summarise(run: Path) -> dict:
    layout = RunLayout(run)
    rounds = [read_done(p)["metrics"] for p in layout.rounds()]
    if not rounds:
        raise SystemExit(f"{run}: no finished rounds (round_*/done.json)")
    lineage = layout.report / "lineage.json"
    ev = json.loads(lineage.read_text())["metrics"] if lineage.is_file() else None
    cfg = json.loads(lineage.read_text())["config"] if lineage.is_file() else None
    steps = cfg["opd"]["steps_per_round"] if cfg else None
    phase = {k: sum(r[k] for r in rounds) for k in PHASES}
    return {"run": str(run), "rounds": len(rounds), "reverse_kl_per_round": [r["reverse_kl"] for r in rounds],
            "phase_s": phase, "opd_wall_s": sum(phase.values()),
            "first_round_sync_s": rounds[0]["sync_s"],
            # after round 1 (whose first sync also starts the engine): seconds per weight sync
            "later_sync_s_per_step": sum(r["sync_s"] for r in rounds[1:]) / (steps * (len(rounds) - 1))
            if steps and len(rounds) > 1 else None,
            "sync_fraction_of_later_rounds": sum(r["sync_s"] for r in rounds[1:])
            / max(1e-9, sum(r[k] for r in rounds[1:] for k in PHASES)),
            "final": {name: {"accuracy": m.get("accuracy"), "reverse_kl": m.get("reverse_kl")}
                      for name, m in ev.items()} if ev else None}


def run(config: str, home: str, mode: str, extra: list[str]) -> Path:
    key = f"sync-{mode}-{uuid.uuid4().hex[:6]}"
    cmd = [str(Path(sys.executable).with_name("opd")), "run", config, "--set", f"home={home}",
           "--set", f"opd.weight_sync={mode}", "--set", f"registry.bucket=opd-bench-sync-{mode}", "--run-key", key, *extra]
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"{mode}: {time.time() - t0:.0f} s end to end")
    return RunLayout.of(home, key).root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--home", default=".opd")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set KEY=VALUE for both runs")
    ap.add_argument("--from-runs", nargs=2, type=Path, metavar=("INPLACE_RUN", "RESTART_RUN"))
    ap.add_argument("--note", default="", help="recorded in the JSON (e.g. what else shared the machine)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "weight_sync.json")
    args = ap.parse_args()
    extra = [a for o in args.overrides for a in ("--set", o)]
    runs = args.from_runs or [run(args.config, args.home, m, extra) for m in ("inplace", "restart")]
    a, b = summarise(runs[0]), summarise(runs[1])
    same_kl = max(abs(x - y) for x, y in zip(a["reverse_kl_per_round"], b["reverse_kl_per_round"]))
    res = {"inplace": a, "restart": b, "opd_wall_ratio_restart_over_inplace": b["opd_wall_s"] / a["opd_wall_s"],
           "max_abs_diff_reverse_kl_per_round": same_kl, "note": args.note,
           "command": " ".join(sys.argv)}
    print(f"{'':>22} {'inplace':>10} {'restart':>10}")
    for k in PHASES:
        print(f"{k:>22} {a['phase_s'][k]:>10.1f} {b['phase_s'][k]:>10.1f}")
    print(f"{'OPD rounds wall s':>22} {a['opd_wall_s']:>10.1f} {b['opd_wall_s']:>10.1f}")
    for name in ("opd_student", "sft_student"):
        if a["final"] and b["final"] and name in a["final"]:
            print(f"{name + ' accuracy':>22} {a['final'][name]['accuracy']:>10.3f} {b['final'][name]['accuracy']:>10.3f}")
    print(f"restart / inplace OPD wall: {res['opd_wall_ratio_restart_over_inplace']:.1f}x; "
          f"max |diff| of per-round reverse KL: {same_kl:.2g}")
    args.out.write_text(json.dumps(res, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
