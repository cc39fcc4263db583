"""The project's configuration loader, and the merged parameters of an environment for DVC.

- :class:`ProjectConfigLoader`: Kedro's ``OmegaConfigLoader`` plus the ``${env_folder:}``
  resolver, so every output path in ``conf/base/catalog.yml`` lives in the environment's own
  folder: ``data/06_models/mixup.pt`` in the default environment (``local``) and
  ``data/06_models/<env>/mixup.pt`` under ``--env=<env>``. Two environments never read or
  overwrite each other's checkpoints, shards, reports or predictions.
- ``python -m cassava_pipeline.config --env <env> --out <file>``: writes the parameters Kedro
  merges for that environment (``conf/base`` overridden key by key by ``conf/<env>``), plus a
  digest of the merged catalog. ``dvc.yaml`` takes its ``params`` from that file, so an edit in
  any environment's files reruns exactly the stages whose keys changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path
from typing import Any

import yaml
from kedro.config import OmegaConfigLoader
from omegaconf import OmegaConf

DEFAULT_ENV = "local"
LOADER_ARGS: dict[str, Any] = {
    "base_env": "base",
    "default_run_env": DEFAULT_ENV,
    # An environment (conf/kaggle, conf/local) overrides parameters and MLflow settings key by
    # key instead of whole sections: conf/local/mlflow.yml names only the tracking server.
    "merge_strategy": {"parameters": "soft", "mlflow": "soft"},
}


def env_folder(env: str | None) -> str:
    """The data subfolder of an environment: '' for the default one, '<env>/' for the others."""
    run_env = env or DEFAULT_ENV
    return "" if run_env in (DEFAULT_ENV, LOADER_ARGS["base_env"]) else f"{run_env}/"


class ProjectConfigLoader(OmegaConfigLoader):
    """``OmegaConfigLoader`` with ``${env_folder:}`` bound to this loader's environment."""

    def __getitem__(self, key: str) -> dict[str, Any]:
        # Bound on every read, as Kedro binds its own runtime_params resolver: resolvers are
        # global in OmegaConf, and a process may hold loaders of several environments.
        folder = env_folder(self.env or self.default_run_env)
        OmegaConf.register_new_resolver("env_folder", lambda: folder, replace=True)
        return super().__getitem__(key)


def merged_config(conf_source: str | Path, env: str | None) -> dict[str, Any]:
    """The parameters Kedro runs with in ``env``, plus ``catalog_digest`` of its merged catalog."""
    loader = ProjectConfigLoader(str(conf_source), env=env, **LOADER_ARGS)
    params = loader["parameters"]
    catalog = json.dumps(loader["catalog"], sort_keys=True, default=str)
    return {**params, "catalog_digest": hashlib.sha256(catalog.encode()).hexdigest()}


def main(argv: list[str] | None = None) -> None:
    """Write an environment's merged parameters as YAML (DVC's ``params`` file)."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--env", default=DEFAULT_ENV, help="Kedro environment (conf/<env>)")
    parser.add_argument("--conf", default="conf", help="configuration folder")
    parser.add_argument("--out", required=True, help="YAML file to write")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "# Written by python -m cassava_pipeline.config: do not edit; edit conf/ instead.\n"
    text += yaml.safe_dump(merged_config(args.conf, args.env), sort_keys=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    tmp.replace(out)


if __name__ == "__main__":
    main()
