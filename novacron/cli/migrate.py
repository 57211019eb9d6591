"""``novacron migrate VM --to HOST``: start a migration, follow its progress, summarise."""

from __future__ import annotations

import argparse
import time

from novacron.cli.cluster import connect
from novacron.cli.render import human_size, out
from novacron.config import Settings
from novacron.errors import OperationTimeout


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Move a VM to another host with a progress bar, or print the prediction (``--dry-run``)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from novacron.states import MigrationPhase

    nc = connect(args, settings)
    policy = {"auto_converge": args.auto_converge, "max_downtime_ms": args.max_downtime_ms,
              "bandwidth_mib_s": args.bandwidth, "verify": args.verify}
    if args.dry_run:
        prediction = nc.migrations.predict(args.ref, to=args.to, mode=args.mode, policy=policy)
        if args.json:
            out.print_json(data=prediction)
        else:
            out.print(f"[bold]{args.mode} migration of {args.ref} to {args.to}[/] (prediction, "
                      "nothing moved)")
            out.print(f"  passes {prediction['passes']}, "
                      f"{human_size(prediction['bytes'])} to send, "
                      f"{prediction['duration_s']:.1f} s, downtime "
                      f"{prediction['downtime_s'] * 1000:.0f} ms, "
                      f"{'converges' if prediction['converges'] else 'does NOT converge'}")
        return 0
    mig = nc.migrations.start(args.ref, to=args.to, mode=args.mode, policy=policy)
    columns = (TextColumn("{task.description}"), BarColumn(),
               TextColumn("{task.percentage:>5.1f}%"), TextColumn("{task.fields[detail]}"),
               TimeElapsedColumn())
    deadline = time.monotonic() + args.timeout
    with Progress(*columns, console=out, disable=args.json) as bar:
        task = bar.add_task(mig.id, total=100, detail="")
        while mig.refresh().phase not in (MigrationPhase.COMPLETED, MigrationPhase.ROLLED_BACK,
                                          MigrationPhase.FAILED):
            p = mig.record.progress
            detail = (f"{mig.phase.value} pass {p.iteration} {human_size(p.bytes_sent)} sent, "
                      f"{human_size(p.rate)}/s")
            bar.update(task, completed=p.percent, detail=detail)
            if time.monotonic() > deadline:
                raise OperationTimeout(f"migration {mig.id} is still {mig.phase.value} after "
                                       f"{args.timeout:g} s (it goes on; see its record)")
            time.sleep(0.2)
        bar.update(task, completed=mig.record.progress.percent, detail=mig.phase.value)
    record = mig.record
    if args.json:
        out.print_json(data=record.model_dump(mode="json"))
    else:
        o = record.outcome
        out.print(f"[bold]{record.id}[/] {record.mode} {record.source} -> {record.target}: "
                  f"[{'green' if record.phase == MigrationPhase.COMPLETED else 'red'}]"
                  f"{record.phase.value}[/]" + (f" ({record.reason})" if record.reason else ""))
        if record.phase == MigrationPhase.COMPLETED:
            out.print(f"  total {o.get('total_s', 0):.2f} s, downtime "
                      f"{o.get('downtime_ms', 0):.0f} ms, {human_size(o.get('bytes', 0))} sent, "
                      f"{record.progress.iteration} pass(es)")
    return 0 if record.phase == MigrationPhase.COMPLETED else 1

