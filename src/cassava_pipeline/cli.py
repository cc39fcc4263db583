"""Project commands: Kedro's own ``kedro run``, with known errors printed as one clear message.

Kedro loads this module's ``cli`` group and lets its commands override the built-in ones. Our
``run`` is Kedro's command, unchanged in its options; when the run stops on one of this
project's known errors (bad parameters, a layout that does not match the data, too many unusable
images, a damaged file, missing weights, a project already running, an output a read-only or
full disk would not take), the last lines printed are the cause and what to do, without a
traceback through Kedro's internals. Any other exception is raised as before, with its
traceback: that is a bug to report.

The command also spares Python's cyclic garbage collector the objects that live for the whole run
(:func:`freeze_long_lived`): torch, MLflow, Kedro and the rest, about 550,000 objects when the
command starts and 880,000 when it ends. Unfrozen, each full collection walks all of them (0.3
to 0.45 s each on this project's CPU box, three in a run) and so does the last one at the
interpreter's exit, which took 2.5 to 3.0 s after the run had ended (0.4 s frozen). A run that
reuses every stage took 17.4 to 18.1 s instead of 20.3 to 20.5 s.
"""

from __future__ import annotations

import gc
import sys

import click
from kedro.framework.cli.project import run as kedro_run

from cassava_pipeline.params import ParameterError
from cassava_pipeline.runlock import ProjectBusyError
from cassava_pipeline.vision.atomic import WriteError
from cassava_pipeline.vision.export import ExportError
from cassava_pipeline.vision.ingest import IngestError
from cassava_pipeline.vision.integrity import IntegrityError
from cassava_pipeline.vision.layouts import LayoutError
from cassava_pipeline.vision.models import WeightsError
from cassava_pipeline.vision.presize import PresizeError
from cassava_pipeline.vision.split import SplitError

# The errors whose message says what went wrong and what to do: no traceback needed.
KNOWN_ERRORS: tuple[type[BaseException], ...] = (
    ParameterError,
    LayoutError,
    IngestError,
    SplitError,
    PresizeError,
    IntegrityError,
    WeightsError,
    ExportError,
    ProjectBusyError,
    WriteError,
)


def known_error(error: BaseException) -> BaseException | None:
    """The known error behind ``error`` (itself, or one it was raised from), if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, KNOWN_ERRORS):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def freeze_long_lived() -> None:
    """Move every object alive now into the collector's permanent generation (``gc.freeze``).

    Collections, the final one at exit included, then skip them. They are still freed by
    reference counting as usual; only a reference cycle among them would wait for the process
    to end, which is when a command's objects go anyway. For a command's process, not a library
    call: a long-lived process that froze its objects could keep such cycles for good."""
    gc.freeze()


def _run(*args, **kwargs):
    freeze_long_lived()  # the imports, the project's settings and the CLI: here until the end
    try:
        return kedro_run.callback(*args, **kwargs)
    except Exception as e:
        cause = known_error(e)
        if cause is None:
            raise
        click.secho(f"\nThe run stopped: {type(cause).__name__}", fg="red", bold=True, err=True)
        click.echo(str(cause), err=True)
        sys.exit(1)
    finally:
        freeze_long_lived()  # what the run left: only the interpreter's exit follows


run = click.Command(
    name="run",
    params=kedro_run.params,
    callback=_run,
    help=kedro_run.help,
    short_help=kedro_run.short_help,
    context_settings=kedro_run.context_settings,
)


@click.group(name="cassava_pipeline")
def cli() -> None:
    """cassava-pipeline's project commands."""


cli.add_command(run)
