"""The `screen` command line: parse, call one function, print. Heavy imports stay inside commands."""
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click

from screener.errors import ScreenerError

if TYPE_CHECKING:
    from screener.dft.verify import Verification
    from screener.pipeline import Summary


class ScreenGroup(click.Group):
    """Prints user errors (bad files, changed settings) as one line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (ScreenerError, FileNotFoundError) as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=ScreenGroup)
@click.version_option(package_name="dos-screener")
def main() -> None:
    """Screen crystal structures by ALIGNN-predicted density of states."""


def parse_window(_ctx, _param, value: str | None) -> tuple[float, float] | None:
    """--bandgap and other LO:HI options (window.parse_window)."""
    from screener.window import parse_window as parse

    try:
        return None if value is None else parse(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def parse_elements(_ctx, _param, value: str | None) -> tuple[str, ...]:
    """'o, Fe' -> ('O', 'Fe'): symbols in any case, each an element."""
    from screener.io import element_symbol

    try:
        return tuple(element_symbol(v) for v in value.split(",") if v.strip()) if value else ()
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


def results_folder(_ctx, _param, value: str) -> str:
    """-o of `run`: a folder that can be made or written, checked before Ray starts (and before
    anything is made: other checks may still refuse the command)."""
    from screener.results.manifest import results_dir_problem

    problem = results_dir_problem(value)
    if problem:
        raise click.BadParameter(f"{value}: {problem}")
    return value


def new_file(_ctx, _param, value: str | None) -> str | None:
    """An output file's path: its folder exists and can be written, and it is not a folder."""
    if value is not None:
        path = Path(value)
        if path.is_dir():
            raise click.BadParameter(f"{value}: is a folder")
        if not path.parent.resolve().is_dir() or not os.access(path.parent.resolve(), os.W_OK):
            raise click.BadParameter(f"{value}: its folder does not exist or cannot be written")
    return value


def model_path(_ctx, _param, value: str | None) -> Path:
    """--model of every command that loads a model (shipped.resolve_model)."""
    from screener.shipped import resolve_model

    try:
        return resolve_model(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


MODEL_HELP = ("Checkpoint file, `screen train` run folder, or a shipped model: d-alignn (the "
              "default; closer spectra) or ae-alignn (closer band gaps); see "
              "screener/data/MODEL_CARD.md.")


@main.command()
@click.option("--structures", required=True, type=click.Path(exists=True), help="Folder, file or JARVIS json(.gz).")
@click.option("--bandgap", callback=parse_window, help="Shortlist window in eV, LO:HI.")
@click.option("-o", "--out", "out_dir", default="results", show_default=True, type=click.Path(),
              callback=results_folder)
@click.option("--model", callback=model_path, metavar="PATH|NAME", help=MODEL_HELP)
@click.option("--address", help="Ray cluster address ('auto', 'ray://host:10001'); default: a local Ray.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(min=1),
              help="Prediction actors (default: one per GPU, else CPUs/2).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--shard-size", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--strict", is_flag=True, help="Exit non-zero when any structure failed.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--verify", "verify_top", type=click.IntRange(min=1), metavar="N",
              help="Then DFT-check (GPAW) the N shortlisted structures likeliest in --bandgap "
                   "(then the predicted gap furthest inside it; ties by id): verify.csv and "
                   "the label root labels/ in --out. A rerun skips finished structures.")
@click.option("--min-probability", type=click.FloatRange(0, 1), metavar="P",
              help="Shortlist structures whose gap is in --bandgap or whose P(gap in "
                   "--bandgap) >= P (default: the model's, chosen on validation).")
@click.option("--strict-domain", is_flag=True,
              help="Leave structures outside the model's training domain (unseen elements, "
                   "larger cells) off the shortlist.")
def run(structures, bandgap, out_dir, model, address, device, workers, batch_size, shard_size,
        strict, quiet, verify_top, min_probability, strict_domain):
    """Predict the DOS of every structure and shortlist those whose gap is in --bandgap."""
    from screener.pipeline import RunOptions
    from screener.screen import OptionError, screen

    opts = RunOptions(structures=structures, out_dir=Path(out_dir), model=model, address=address,
                      device=device, workers=workers, batch_size=batch_size,
                      shard_size=shard_size)
    try:
        summary = screen(opts, bandgap=bandgap, min_probability=min_probability,
                         strict_domain=strict_domain, verify_top=verify_top, progress=not quiet)
    except OptionError as error:
        raise click.UsageError(str(error)) from None
    _print_run(summary.run)
    for f in summary.failures[:20]:
        click.echo(f"  failed {f.id} [{f.stage}] {f.source}: {f.reason}", err=True)
    if len(summary.failures) > 20:
        click.echo(f"  ... {len(summary.failures) - 20} more failures: screen failures {out_dir}",
                   err=True)
    if summary.n_outside_domain:
        click.echo(f"{summary.n_outside_domain} structures lie outside the model's training "
                   f"domain (unseen elements or larger cells): column in_domain"
                   f"{'; left off the shortlist' if strict_domain else ''}")
    if summary.shortlist is not None:
        from screener.results.tables import format_table

        click.echo(f"shortlisted {len(summary.shortlist['ids'])} with {bandgap[0]} <= gap <= "
                   f"{bandgap[1]} eV or P(in window) >= {summary.min_probability:.2f} -> "
                   f"{summary.shortlist_path}")
        click.echo(format_table(summary.shortlist, SHORTLIST_SHOWN))
    if summary.verification is not None:
        _print_verification(summary.verification, out_dir, bandgap)
    if strict and summary.run.n_failed:
        raise SystemExit(f"--strict: {summary.run.n_failed} structures failed")


SHORTLIST_SHOWN = ("ids", "formula", "p_in_window", "band_gap_eV", "band_gap_std_eV", "p_metal",
                   "dos_band_gap_eV", "in_domain")


def _print_run(run: "Summary") -> None:
    """The prediction run's counts, times and repairs."""
    if run.manifest_rebuilt_because:
        click.echo(f"  rebuilt the manifest from the intact shards: "
                   f"{run.manifest_rebuilt_because}", err=True)
    click.echo(
        f"read {run.n_read}  failed {run.n_failed}  predicted {run.n_predicted}  "
        f"({run.rate:.1f} structures/s, {run.seconds:.1f} s; {run.n_skipped_shards} shards resumed)"
    )
    stages = ", ".join(f"{stage} {sec:.1f} s" for stage, sec in run.stage_seconds.items())
    click.echo(f"stage time (summed over workers): {stages}")
    for name in run.damaged:
        click.echo(f"  recomputed damaged shard {name}", err=True)


def _print_verification(checked: "Verification", out_dir: str,
                        bandgap: tuple[float, float]) -> None:
    """The DFT check of `run --verify`: its table and one line of counts."""
    from screener.dft import verify
    from screener.results.tables import format_table

    click.echo(format_table(checked.rows, verify.SHOWN))
    computed = checked.labelling.n_labelled + checked.labelling.n_failed
    click.echo(f"verified {checked.n_checked} of {len(checked.rows['id'])}: {checked.n_confirmed} "
               f"confirmed inside {bandgap[0]:g}:{bandgap[1]:g} eV ({computed} calculated in this "
               f"run) -> {Path(out_dir) / verify.TABLE}")


@main.command()
@click.argument("results", type=click.Path(exists=True, file_okay=False))
@click.option("--bandgap", callback=parse_window, help="Gap window in eV, LO:HI.")
@click.option("--elements", callback=parse_elements,
              help="Comma-separated elements that must all be present.")
@click.option("--exclude", callback=parse_elements, help="Comma-separated elements that must be absent.")
@click.option("--formula", help="Exact reduced formula, e.g. GaAs.")
@click.option("--dos-at-ef", callback=parse_window, help="DOS at E_F window, LO:HI.")
@click.option("--n-atoms", callback=parse_window, help="Atoms per cell, LO:HI.")
@click.option("--min-probability", type=click.FloatRange(0, 1), metavar="P",
              help="With --bandgap: keep gaps in the window or P(gap in window) >= P (default: "
                   "the model's choice).")
@click.option("--sort", default="auto", show_default=True,
              help="Column; prefix '-' for descending; auto: -p_in_window with --bandgap, "
                   "else band_gap.")
@click.option("--limit", type=click.IntRange(min=0))
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True)
def query(results, bandgap, elements, exclude, formula, dos_at_ef, n_atoms, min_probability, sort,
          limit, fmt):
    """Filter the predictions of a (possibly still running) screening job."""
    import sys

    from screener.results import query as results_query
    from screener.results.tables import format_table, to_json, with_units, write_csv

    try:
        rows = with_units(results_query.query(
            results, bandgap=bandgap, elements=elements, exclude=exclude, formula=formula,
            dos_at_ef=dos_at_ef, n_atoms=n_atoms, min_probability=min_probability, sort=sort,
            limit=limit))
    except results_query.UnknownColumn as error:
        raise click.BadParameter(str(error), param_hint="'--sort'") from None
    if len(rows["ids"]) == 0:
        click.echo("0 matches", err=True)
    if fmt == "csv":
        write_csv(rows, sys.stdout)
    elif fmt == "json":
        click.echo(to_json(rows))
    else:
        click.echo(format_table(rows))


@main.command()
@click.argument("results", type=click.Path(exists=True, file_okay=False))
def failures(results):
    """List every structure that failed, with its file and reason."""
    from screener.results.query import read_failures

    found = read_failures(results)
    for f in found:
        click.echo(f"{f.id}\t{f.stage}\t{f.source}\t{f.reason}")
    if not found:
        click.echo("no failures", err=True)


@main.command()
@click.argument("results", type=click.Path(exists=True, file_okay=False))
@click.argument("structure_id")
@click.option("-o", "--out", "out_path", default=None, callback=new_file,
              help="PNG path (default: <id>.png).")
def plot(results, structure_id, out_path):
    """Plot one predicted DOS with E_F, VBM and CBM marked."""
    from screener.plots import plot_prediction

    path = plot_prediction(results, structure_id, out_path or f"{structure_id}.png")
    click.echo(f"wrote {path}")


@main.group()
def data() -> None:
    """Make a training set (HDF5: graphs, DOS targets, split) from one DOS data source."""


def _training_set_options(command):
    """Options every `data` subcommand shares: where to write, split seed, extra gaps."""
    command = click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
                           help="Training set file to write (.h5).")(command)
    command = click.option("--seed", type=int, default=0, show_default=True,
                           help="Seed of the 70/10/20 train/val/test split.")(command)
    return click.option("--ref-gaps", type=click.Path(exists=True, dir_okay=False),
                        help="JARVIS-form json(.gz) whose optb88vdw_bandgap fills unknown gaps.")(command)


@data.command("jarvis-edos")
@click.option("--cache", "cache_dir", default="~/.cache/dos-screener/jarvis", show_default=True,
              help="Where jarvis-tools keeps the downloaded figshare file.")
@_training_set_options
def data_jarvis_edos(cache_dir, out, seed, ref_gaps):
    """The ~48k JARVIS-DFT eDOS spectra (jarvis-tools download, cached)."""
    import os

    from screener.training.dataset import from_jarvis_edos

    _write_training_set(from_jarvis_edos(os.path.expanduser(cache_dir)), out, seed, ref_gaps)


@data.command("json")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--level-of-theory", default="unknown", show_default=True,
              help="Recorded in the file's provenance, e.g. 'DFT, GPAW, PBE'.")
@_training_set_options
def data_json(path, level_of_theory, out, seed, ref_gaps):
    """JARVIS-form records (jid, atoms, edos_up) from a json(.gz) file."""
    from screener.training.dataset import from_json

    _write_training_set(from_json(path, level_of_theory), out, seed, ref_gaps)


@data.command("vasprun")
@click.argument("path", type=click.Path(exists=True))
@_training_set_options
def data_vasprun(path, out, seed, ref_gaps):
    """VASP runs: every vasprun*.xml(.gz) under PATH, total DOS per valence electron."""
    from screener.training.dataset import from_vasprun

    _write_training_set(from_vasprun(path), out, seed, ref_gaps)


def _write_training_set(labelled, out: str, seed: int, ref_gaps: str | None) -> None:
    import numpy as np

    from screener.training.dataset import merge_ref_gaps, skipped_summary, write_training_set

    click.echo(skipped_summary(labelled.skipped), err=bool(labelled.skipped))
    if ref_gaps:
        click.echo(f"reference gaps filled from {ref_gaps}: {merge_ref_gaps(labelled, ref_gaps)}")
    if not labelled.structures:
        raise click.ClickException("no usable structures: nothing written")
    write_training_set(out, labelled.structures, labelled.dos, labelled.ref_gap,
                       labelled.provenance, extra=labelled.extra, seed=seed)
    known = int(np.isfinite(labelled.ref_gap).sum())
    click.echo(f"wrote {out}: {len(labelled.structures)} structures ({known} with a reference gap), "
               f"{len(labelled.skipped)} skipped")


@main.command("evaluate")
@click.option("--model", "model_path", callback=model_path, metavar="PATH|NAME", help=MODEL_HELP)
@click.option("--data", "data_path", required=True, type=click.Path(exists=True),
              help="Training set: an .h5 from `screen data` or a label folder from `screen label`.")
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default="test",
              show_default=True, help="Rows to score; the checkpoint's split when it stores one.")
@click.option("-o", "--out", "out_dir", default="report", show_default=True,
              type=click.Path(file_okay=False))
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device, e.g. cpu, cuda.")
@click.option("--gaps", type=click.Path(exists=True, dir_okay=False),
              help="The model's --gaps file, where it lies elsewhere than where it was trained "
                   "(checked by sha256); default: the path in the checkpoint.")
def evaluate_model(model_path, data_path, split, out_dir, batch_size, device, gaps):
    """Score a model on a split: metrics.json, figures and index.html in --out."""
    from screener.training.evaluate import evaluate

    report = evaluate(model_path, data_path, split=split, out_dir=out_dir, batch_size=batch_size,
                      device=device, gap_file=gaps)
    s, g = report["summary"], report["band_gap"]
    click.echo(f"{s['n']} structures, {split} split from the {report['split']['from']}: "
               f"MAE mean {s['mae_mean']:.4f} median {s['mae_median']:.4f}, baseline "
               f"{s['baseline_mae_mean']:.4f} ({s['baseline_over_model']:.2f}x), "
               f"MAE < 0.02: {s['share_mae_below_0.02']:.0%}, RE < 0.2: {s['share_re_below_0.2']:.0%}")
    click.echo("baseline / model by energy window: " + ", ".join(
        f"{window} {w['baseline_over_model']:.2f}" for window, w in report["by_energy"].items()))
    if g["n_known"]:
        click.echo(f"band gap from predicted DOS: MAE {g['gap_mae']:.3f} eV over {g['n_known']} "
                   f"known, confusion [ref metal, non-metal] x [pred metal, non-metal] {g['confusion']}")
    if report["learned_gap"]:
        lg = report["learned_gap"]
        click.echo(f"learned band gap: MAE {lg['gap_mae']:.3f} eV over {lg['n_known']} reference "
                   f"gaps, confusion [[metal, non-metal] x predicted] {lg['confusion']}; ECE of "
                   f"P(metal) {lg['ece_p_metal']:.3f}, of P({lg['window'][0]:g}-"
                   f"{lg['window'][1]:g} eV) {lg['ece_p_in_window']:.3f}")
    if report["gap_set"]:
        gs = report["gap_set"]
        click.echo(f"gap set ({gs['split']} split, {gs['n']} structures): band gap from predicted "
                   f"DOS MAE {gs['gap_mae']:.3f} eV, confusion {gs['confusion']}")
    for note in report["notes"]:
        click.echo(f"note: {note}")
    click.echo(f"report: {out_dir}/index.html")


@main.command("train")
@click.argument("data_path", type=click.Path(exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder: checkpoints, metrics.csv/json, model.pt. Rerun to resume.")
@click.option("--arch", type=click.Choice(["d-alignn", "ae-alignn"]), default="d-alignn",
              show_default=True)
@click.option("--latent", type=int, default=12, show_default=True, help="AE-ALIGNN latent size k.")
@click.option("--latent-sweep", is_flag=True, help="AE-ALIGNN for k = 8, 12, 16, 20 (paper Table 1).")
@click.option("--workers", type=int, default=1, show_default=True, help="DDP workers.")
@click.option("--gpus-per-worker", type=float, default=0, show_default=True)
@click.option("--cpus-per-worker", type=click.IntRange(min=1),
              help="CPUs and torch threads per worker (default: a one-node Ray's free CPUs "
                   "shared among the workers; 1 beside GPUs or on several nodes).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Per worker.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak one-cycle rate.")
@click.option("--epochs", type=int, default=300, show_default=True)
@click.option("--patience", type=int, default=30, show_default=True,
              help="Stop after this many epochs without a better validation score (MAE, plus "
                   "the --gaps term when given).")
@click.option("--loss", type=click.Choice(["mse", "l1"]), default="mse", show_default=True)
@click.option("--amp", is_flag=True, help="bfloat16 autocast (for GPUs).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="ALIGNNConfig override, e.g. --set hidden=64 (repeatable).")
@click.option("--ae-epochs", type=int, default=200, show_default=True)
@click.option("--gaps", type=click.Path(exists=True, dir_okay=False),
              help="JARVIS records (json/json.gz) whose optB88vdW gaps bound the predicted DOS of "
                   "structures without a DOS label.")
@click.option("--hold-out", multiple=True, type=click.Path(exists=True),
              help="Structures to leave out of --gaps, e.g. the ones the model will screen "
                   "(repeatable).")
@click.option("--gap-weight", type=float, default=10.0, show_default=True,
              help="Weight of the --gaps bounds term next to the spectrum loss; for "
                   "AE-ALIGNN also times its latent loss's scale over the DOS's.")
@click.option("--address", help="Ray cluster address; default: a local Ray.")
@click.option("--seed", type=int, default=0, show_default=True)
def train_command(data_path, out_dir, arch, latent, latent_sweep, overrides, **options):
    """Train D-ALIGNN or AE-ALIGNN on a training set with Ray Train (DDP, early stopping)."""
    from screener.training import train

    options["config"] = _overrides(overrides)
    if latent_sweep:
        for row in train.latent_sweep(data_path, out_dir, **options):
            click.echo(f"k={row['latent']:3d}  reconstruction MAE {row['reconstruction_val_mae']:.4f}  "
                       f"end-to-end MAE {row['val_mae']:.4f}  (baseline {row['baseline_val_mae']:.4f})")
        return
    metrics = train.train(data_path, out_dir, arch=arch, latent=latent, **options)
    if "reconstruction_val_mae" in metrics:
        click.echo(f"autoencoder reconstruction MAE {metrics['reconstruction_val_mae']:.4f}")
    if options["gaps"]:
        click.echo(f"gap-set bounds excess on validation {metrics['val_gap_excess']:.5f}")
    click.echo(f"best epoch {metrics['best_epoch']} of {metrics['epochs_run']}: validation MAE "
               f"{metrics['val_mae']:.4f} (baseline {metrics['baseline_val_mae']:.4f}) -> {out_dir}/model.pt")


@main.command("gap-head")
@click.option("--model", "model_file", callback=model_path, metavar="PATH|NAME", help=MODEL_HELP)
@click.option("--data", "data_path", required=True, type=click.Path(exists=True),
              help="The labelled training set the model trained on (.h5 or label folder).")
@click.option("--gaps", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JARVIS records (json/json.gz) with optB88vdW gaps.")
@click.option("--hold-out", multiple=True, type=click.Path(exists=True),
              help="Structures to leave out, as in `screen train` (repeatable).")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint to write: the model with its gap head.")
@click.option("--members", type=click.IntRange(min=2), default=8, show_default=True,
              help="Ensemble members of the head.")
@click.option("--seed", type=int, default=0, show_default=True)
def gap_head_command(model_file, data_path, gaps, hold_out, out, members, seed):
    """Fit a learned band gap and P(metal) head on a trained D-ALIGNN, calibrated on validation."""
    from screener.training import gap_fit

    report = gap_fit.fit(model_file, data_path, gaps, out, hold_out=hold_out, members=members,
                         seed=seed)
    click.echo(f"validation ({report['n_val']} known gaps): gap MAE {report['val_gap_mae']:.3f} eV, "
               f"metal/non-metal accuracy {report['val_metal_accuracy']:.3f}, ECE of P(metal) "
               f"{report['val_ece_p_metal']:.3f}, of P(in {report['choice_window'][0]:g}-"
               f"{report['choice_window'][1]:g} eV) {report['val_ece_p_in_window']:.3f}; "
               f"default --min-probability {report['min_probability']:.2f} -> {out}")


def _overrides(pairs: tuple[str, ...]) -> dict:
    """KEY=VALUE pairs, values read as JSON (numbers, true/false) or else kept as text."""
    import json

    config = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--set")
        try:
            config[key] = json.loads(value)
        except json.JSONDecodeError:
            config[key] = value
    return config


@main.command("label")
@click.option("--structures", type=click.Path(exists=True),
              help="shortlist.csv (id, source), folder, file or JARVIS json(.gz).")
@click.option("-o", "--out", default="data/labels", show_default=True,
              type=click.Path(file_okay=False),
              help="Label root: each run adds a part to <out>/<level>/ with what it finished; "
                   "structures labelled or failed there are skipped, finished work waits in "
                   "<out>/<level>.work/.")
@click.option("--address", help="Ray cluster address; default: a local Ray.")
@click.option("--workers", type=int, help="Calculations at once (default: one per Ray CPU).")
@click.option("--timeout", type=float, default=600.0, show_default=True,
              help="Wall-time limit per structure, seconds.")
@click.option("--limit", type=int, help="Only the first N structures after ordering.")
@click.option("--order", type=click.Choice(["input", "small-first", "gap-balanced", "uncertainty"]),
              default="input", show_default=True,
              help="small-first: each element's smallest structure, then fewest atoms first; "
                   "gap-balanced: the same, alternating JARVIS-gapped and other structures "
                   "after the elements' first; uncertainty: where --model's gap ensemble "
                   "disagrees most, the rarest elements first among near-ties.")
@click.option("--model", type=click.Path(exists=True, dir_okay=False),
              help="Model with a gap head, for --order uncertainty.")
@click.option("--kpt-density", type=float, default=2.5, show_default=True,
              help="k-points per reciprocal Angstrom (ASE density).")
@click.option("--retry-failed", is_flag=True,
              help="Calculate failed structures again (a lost Ray task is always tried again).")
@click.option("--export-only", is_flag=True,
              help="Only add the finished work of an interrupted run as a part.")
@click.option("--import", "import_file", type=click.Path(exists=True, dir_okay=False),
              help="Add a training set written by an older `screen label` (.h5 with its "
                   ".failures.csv) as a part.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def label_command(structures, out, address, workers, timeout, limit, order, model, kpt_density,
                  retry_failed, export_only, import_file, quiet):
    """DFT-label structures with GPAW (PBE, LCAO dzp): DOS, gap, energy -> label parts."""
    from screener.dft import label

    if export_only or import_file:
        try:
            done = label.import_training_set(import_file, out) if import_file else \
                label.export(out)
        except (ValueError, FileNotFoundError) as error:
            raise click.ClickException(str(error)) from None
        click.echo(f"wrote {done.path}: {done.n_labelled} labelled, {done.n_failed} failed")
        return
    if structures is None:
        raise click.UsageError("--structures is required unless --export-only or --import")
    try:
        summary = label.label(structures, out, label.Settings(kpt_density=kpt_density),
                              address=address, workers=workers, timeout=timeout, limit=limit,
                              order=order, retry_failed=retry_failed, progress=not quiet,
                              model=model)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{summary.n_selected} selected: {summary.n_already} already done, "
               f"{summary.n_labelled} labelled, {summary.n_failed} failed in {summary.seconds:.0f} s")
    for f in summary.failures[:20]:
        click.echo(f"  failed {f.id} [{f.stage}] {f.source}: {f.reason}", err=True)
    if summary.exported:
        click.echo(f"wrote {summary.exported.path}: {summary.exported.n_labelled} labelled, "
                   f"{summary.exported.n_failed} failed")


@main.command("check-labels")
@click.argument("labels", type=click.Path(exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for check.json, gap_parity.png and dos_overlay/.")
@click.option("--edos", type=click.Path(exists=True, dir_okay=False),
              help="JARVIS-form json(.gz) with edos_up: compare the DOS of structures in both.")
def check_labels_command(labels, out_dir, edos):
    """Compare `screen label` output with JARVIS: gaps vs optB88vdW, DOS vs edos_up."""
    from screener.dft.check_labels import REPORT, check_labels, format_report

    report = check_labels(labels, out_dir, edos)
    click.echo(format_report(report))
    click.echo(f"wrote {Path(out_dir) / REPORT} and {len(report['figures'])} figure(s)")


@main.command("generate")
@click.option("--parents", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JARVIS-form json(.gz) with optb88vdw_bandgap: its gapped cells are the "
                   "prototypes, and none of its compositions is made again.")
@click.option("--exclude", multiple=True, type=click.Path(exists=True),
              help="Known structures (folder, file or JARVIS json) whose compositions are not "
                   "made either (repeatable).")
@click.option("-o", "--out", required=True, callback=new_file,
              help="Candidates to write (.json.gz); rejections go to <out>.rejected.csv. An "
                   "existing file is resumed, not redone.")
@click.option("--max-atoms", type=click.IntRange(min=1), default=20, show_default=True,
              help="Largest parent cell.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True), default=1e-3,
              show_default=True, help="Lowest substitution probability (Hautier et al.).")
@click.option("--limit", type=click.IntRange(min=0), help="Relax only the first N candidates.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the order.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Relaxations at once: 1 runs in this process, more as Ray tasks.")
@click.option("--address", help="Ray cluster address; relaxes on Ray even with one worker.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def generate_command(parents, exclude, out, max_atoms, threshold, limit, seed, workers,
                     address, quiet):
    """Hypothetical compounds: charge-balanced substitution into gapped parents, CHGNet-relaxed."""
    from screener.pool import generate

    s = generate.generate(parents, out, exclude, max_atoms, threshold, limit, seed,
                          workers=workers, address=address, progress=not quiet)
    e = s.enumeration
    click.echo(f"parents: {s.n_gapped} gapped (> {generate.GAPPED_ABOVE} eV) with <= "
               f"{max_atoms} atoms, {s.n_parents} with oxidation states in the table")
    click.echo(f"substitutions with P >= {threshold:g}: {len(e.candidates)} candidates; dropped "
               f"{e.n_unbalanced} not charge-balanced, {e.n_known} of a known composition, "
               f"{e.n_duplicates} duplicates")
    reasons = ", ".join(f"{n} {reason}" for reason, n in s.rejected.most_common())
    click.echo(f"{s.n_selected} selected, {s.n_already} already done; relaxed {s.n_relaxed}: "
               f"kept {s.n_kept}, rejected {sum(s.rejected.values())}"
               f"{f' ({reasons})' if reasons else ''}"
               f"{f', {s.n_lost} lost by Ray (tried again next run)' if s.n_lost else ''}")
    if s.n_relaxed:
        click.echo(f"{generate.throughput(s):.3f} candidates per core-second of relaxation; "
                   f"{s.n_relaxed / (s.seconds * s.workers):.3f} per core-second of the "
                   f"{s.seconds:.0f} s run on {s.workers} worker(s)")
    click.echo(f"{out}: {s.n_pool} candidates, {len(s.elements)} elements; rejections in "
               f"{generate.rejected_path(out)}")


# -- end of commands --


if __name__ == "__main__":
    main()
