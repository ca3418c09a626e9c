"""`ray job submit` entry point: run a screening campaign described by a TOML file.

    ray job submit --address http://<head>:8265 --working-dir . -- \
        python jobs/campaign.py jobs/campaign.example.toml

The file's keys are `screen run` options (see `screen run --help`); the job joins the
cluster it was submitted to (`address = "auto"` unless the file says otherwise).
"""
import sys

import tomllib

from screener.cli import main


def run_args(config: dict) -> list[str]:
    """TOML keys -> `screen run` arguments: `batch_size = 64` -> `--batch-size 64`, flags as booleans."""
    args = ["run"]
    for key, value in {"address": "auto", **config}.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is not False:
            args += [flag, str(value)]
    return args


if __name__ == "__main__":
    with open(sys.argv[1], "rb") as fh:
        main(run_args(tomllib.load(fh)))
