from packds.cli import run

raise SystemExit(run())
