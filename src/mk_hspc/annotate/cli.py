"""``kedro annotate``: a Kedro project command (entry point ``kedro.project_commands``, as kedro-viz does).

- ``kedro annotate`` serves the exported site (catalog ``annotation_site``) with the label store (catalog
  ``label_store``) on 127.0.0.1:8765 (``annotate`` parameters; ``--host``/``--port`` override);
- ``kedro annotate export`` writes the catalog's ``labels`` (the labels contract) from the store;
- ``kedro annotate import FILE...`` adds a labels file or a Label Studio JSON export to the store.
"""

from __future__ import annotations

import getpass
import json
import logging
from pathlib import Path
from typing import Any

import click

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


@click.group(name="mk-hspc")
def commands() -> None:
    """mk-hspc project commands."""


def _context(metadata: Any, env: str | None) -> Any:
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(metadata.project_path)
    session = KedroSession.create(project_path=metadata.project_path, env=env)
    return session.load_context()


class LabelsWouldBeLostError(click.ClickException, ValueError):
    """Writing the labels dataset from the store would drop labels the current file holds."""


def labels_only_in(current: dict[str, Any], payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Entries of the ``current`` labels document that ``payload`` lacks or holds in an older version."""
    newest = {(e["cell_id"], e["annotator"]): e["updated_at"] for e in payload.get("labels", [])}
    return [
        e
        for e in current.get("labels", [])
        if (e["cell_id"], e["annotator"]) not in newest
        or e["updated_at"] > newest[(e["cell_id"], e["annotator"])]
    ]


def _save_labels(catalog: Any, payload: dict[str, Any], *, replace: bool = False) -> str:
    """Write the labels dataset from the label store's ``payload``, refusing (unless ``replace``) when the file
    holds labels the store lacks: labels written by another route (the demo's simulated labels, a copied
    file) would otherwise be dropped without a word."""
    where = str(catalog.get("labels")._describe().get("filepath"))
    if not replace and catalog.exists("labels"):
        try:
            current = catalog.load("labels")
        except Exception as exc:  # noqa: BLE001 - a stale or edited file holds nothing trustworthy to keep
            logger.warning("replacing %s, which cannot be read as a labels dataset (%s)", where, exc)
        else:
            lost = labels_only_in(current, payload)
            if lost:
                raise LabelsWouldBeLostError(
                    f"{where} holds {len(lost)} label(s) the label store lacks (e.g. {lost[0]['cell_id']} by "
                    f"{lost[0]['annotator']}); writing the store's {len(payload['labels'])} would drop them. "
                    f"Import them first (kedro annotate import {where}), or replace the file anyway "
                    "(kedro annotate export --replace)."
                )
    catalog.save("labels", payload)
    return where


def _load_site(catalog: Any) -> Any:
    """The exported annotation site, or a clear message (not a traceback) when there is none yet."""
    from kedro.io import DatasetError

    try:
        return catalog.load("annotation_site")
    except (DatasetError, OSError) as exc:
        raise click.ClickException(
            f"no annotation site to serve ({exc}); export one first: kedro run --pipelines export"
        ) from None


def _site_behind_cells(catalog: Any) -> str | None:
    """Why the site may not show the current candidates (exported from another cells table: another study,
    or segmentation run again since), or None when it was exported from the current one or cannot tell."""
    try:
        built_from = catalog.get("annotation_site").verified_manifest().get("lineage", {}).get("cells")
        current = str(catalog.get("cells").verified_manifest()["digest"])[:16]
    except Exception:  # noqa: BLE001 - no lineage or no cells table: nothing to compare
        return None
    if built_from is None or built_from == current:
        return None
    return (
        f"the annotation site was exported from another cells table ({built_from}) than the current one "
        f"({current}): another study, or segmentation ran again since. Labels refer to the site's cells; "
        "run `kedro run --pipelines export` to label the current candidates."
    )


def _default_annotator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "annotator"


def _annotate_params(params: dict[str, Any]) -> dict[str, Any]:
    """The ``annotate`` parameters block, checked against the schema (a run's hook does not run here)."""
    from pydantic import ValidationError

    from mk_hspc.params_schema import Annotate

    conf = params.get("annotate")
    try:
        Annotate.model_validate(conf)
    except ValidationError as exc:
        problems = [f"annotate.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise click.ClickException("Invalid parameters:\n  " + "\n  ".join(problems)) from None
    return conf


@commands.group(name="annotate", invoke_without_command=True)
@click.option(
    "--host", default=None, help="Address to bind (default: the `annotate.host` parameter, 127.0.0.1)."
)
@click.option("--port", type=int, default=None, help="Port (default: the `annotate.port` parameter).")
@click.option("--env", "-e", default=None, help="Kedro configuration environment.")
@click.option("--annotator", default=None, help="Annotator name the page proposes (default: your user name).")
@click.pass_context
def annotate(
    ctx: click.Context, host: str | None, port: int | None, env: str | None, annotator: str | None
) -> None:
    """Serve the annotation site and store every label in SQLite (127.0.0.1 unless --host says otherwise)."""
    ctx.meta["mk_hspc_env"] = env
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from mk_hspc.annotate.app import create_app

    metadata = ctx.find_root().obj
    context = _context(metadata, env)
    catalog = context.catalog
    conf = _annotate_params(context.params)
    site = _load_site(catalog)
    store = catalog.load("label_store")
    host = host or conf["host"]
    port = int(conf["port"] if port is None else port)
    loopback = host in LOOPBACK_HOSTS
    app = create_app(
        site,
        store,
        default_annotator=annotator or _default_annotator(),
        save_labels=lambda payload: _save_labels(catalog, payload),
        max_body_bytes=int(conf["max_body_bytes"]),
        max_import_bytes=int(conf["max_import_bytes"]),
        allowed_hosts=list(LOOPBACK_HOSTS) if loopback else None,
    )
    stale = _site_behind_cells(catalog)
    if stale:
        click.echo(f"Warning: {stale}", err=True)
    click.echo(f"Annotation site {site.root} ({len(site.cells)} cells), labels in {store.path}")
    click.echo(f"Open http://{host}:{port}/index.html  (Ctrl+C to stop)", err=False)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        store.close()


@annotate.command(name="export")
@click.option("--replace", is_flag=True, help="Write the store's labels even if the file holds others.")
@click.pass_context
def export_command(ctx: click.Context, replace: bool) -> None:
    """Write the catalog's `labels` (latest label per cell and annotator) from the label store."""
    context = _context(ctx.find_root().obj, ctx.parent.meta.get("mk_hspc_env"))
    store = context.catalog.load("label_store")
    try:
        payload = store.payload()
    finally:
        store.close()
    where = _save_labels(context.catalog, payload, replace=replace)
    click.echo(f"{len(payload['labels'])} labels written to {where}")


@annotate.command(name="import")
@click.argument(
    "files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.pass_context
def import_command(ctx: click.Context, files: tuple[Path, ...]) -> None:
    """Add label files (this project's labels JSON, or a Label Studio JSON export) to the label store."""
    from mk_hspc.labels.contract import parse_label_file

    context = _context(ctx.find_root().obj, ctx.parent.meta.get("mk_hspc_env"))
    site = _load_site(context.catalog)
    store = context.catalog.load("label_store")
    try:
        for file in files:
            try:
                events = parse_label_file(json.loads(file.read_text(encoding="utf-8")), source=str(file))
            except json.JSONDecodeError as exc:
                raise click.ClickException(f"{file}: not valid JSON ({exc})") from None
            except ValueError as exc:  # the parser's messages start with the file already
                raise click.ClickException(str(exc)) from None
            if not events:
                click.echo(
                    f"{file}: no labels in it (a Label Studio export holds them in each task's 'annotations'; "
                    "the tasks file written for import into Label Studio has none)"
                )
                continue
            unknown = sorted({e.cell_id for e in events} - set(site.cells))
            if unknown:
                raise click.ClickException(
                    f"{file}: {len(unknown)} cell id(s) not in the site, e.g. {unknown[:3]}"
                )
            result = store.record(events, source=f"import:{file.name}")
            click.echo(f"{file}: {result['added']} labels added, {result['duplicates']} already present")
    finally:
        store.close()
