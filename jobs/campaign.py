"""`ray job submit` entry point: run a screening campaign described by a TOML file.

    ray job submit --address http://<head>:8265 --working-dir . -- \
        python jobs/campaign.py jobs/campaign.example.toml

The file's keys are `screen run` options (see `screen run --help`; `out` is -o); the job joins
the cluster it was submitted to (`address = "auto"` unless the file says otherwise).
"""
import sys
from dataclasses import fields
from pathlib import Path

import tomllib

from screener.pipeline import RunOptions
from screener.screen import screen
from screener.shipped import resolve_model
from screener.window import parse_window

RUN_KEYS = {f.name for f in fields(RunOptions)}


def screen_call(config: dict) -> tuple[RunOptions, dict, bool]:
    """TOML keys -> the RunOptions and keyword arguments of `screen`, and whether the job is
    --strict."""
    options = {"address": "auto", **config}
    options["out_dir"] = Path(options.pop("out", "results"))
    options["model"] = resolve_model(options.get("model"))
    if "bandgap" in options:
        options["bandgap"] = parse_window(options["bandgap"])
    if "verify" in options:
        options["verify_top"] = options.pop("verify")
    options["progress"] = not options.pop("quiet", False)
    strict = options.pop("strict", False)
    opts = RunOptions(**{key: options.pop(key) for key in list(options) if key in RUN_KEYS})
    return opts, options, strict


def main(path: str) -> None:
    with open(path, "rb") as fh:
        opts, options, strict = screen_call(tomllib.load(fh))
    summary = screen(opts, **options)
    run = summary.run
    print(f"read {run.n_read}  failed {run.n_failed}  predicted {run.n_predicted}  "
          f"({run.seconds:.1f} s; {run.n_skipped_shards} shards resumed)")
    if summary.shortlist is not None:
        print(f"shortlisted {len(summary.shortlist['ids'])} -> {summary.shortlist_path}")
    if summary.verification is not None:
        print(f"verified {summary.verification.n_checked}: "
              f"{summary.verification.n_confirmed} confirmed")
    if strict and run.n_failed:
        raise SystemExit(f"--strict: {run.n_failed} structures failed")


if __name__ == "__main__":
    main(sys.argv[1])
