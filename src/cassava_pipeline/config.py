"""The project's configuration loader, and the merged parameters of an environment for DVC.

- :class:`ProjectConfigLoader`: Kedro's ``OmegaConfigLoader`` plus the ``${env_folder:}``
  resolver, so every output path in ``conf/base/catalog.yml`` lives in the environment's own
  folder: ``data/06_models/mixup.pt`` in the default environment (``local``) and
  ``data/06_models/<env>/mixup.pt`` under ``--env=<env>``. Two environments never read or
  overwrite each other's checkpoints, shards, reports or predictions; a user's own images
  (``--params=data.raw=<folder>``, read by ``raw_images``) get a folder of their own below.
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


def env_folder(env: str | None, raw: str | None = None) -> str:
    """The data subfolder of a run's outputs: '' for the default environment, '<env>/' for the
    others, and below it '<folder name>-<8 hex>/' for a user's own images given with
    ``--params=data.raw=<folder>`` (the digest of its absolute path): the sample's outputs and
    those of every data set live apart."""
    run_env = env or DEFAULT_ENV
    folder = "" if run_env in (DEFAULT_ENV, LOADER_ARGS["base_env"]) else f"{run_env}/"
    if raw:
        path = Path(str(raw)).expanduser().resolve()
        folder += f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}/"
    return folder


def raw_override(runtime_params: dict[str, Any] | None) -> str | None:
    """The ``data.raw`` of ``--params`` (a folder of the user's own images), if given."""
    data = (runtime_params or {}).get("data")
    if isinstance(data, dict) and data.get("raw"):
        return str(data["raw"])
    flat = (runtime_params or {}).get("data.raw")  # a dict given as {"data.raw": ...}
    return str(flat) if flat else None


class ProjectConfigLoader(OmegaConfigLoader):
    """``OmegaConfigLoader`` with ``${env_folder:}`` bound to this loader's environment."""

    def __getitem__(self, key: str) -> dict[str, Any]:
        # Bound on every read, as Kedro binds its own runtime_params resolver: resolvers are
        # global in OmegaConf, and a process may hold loaders of several environments.
        folder = env_folder(self.env or self.default_run_env, raw_override(self.runtime_params))
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
