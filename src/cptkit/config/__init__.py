"""Typed configuration: one YAML file, one section per stage, validated before any work."""

from cptkit.config.load import build_config, dump_yaml, load_config
from cptkit.config.schema import Config

__all__ = ["Config", "build_config", "dump_yaml", "load_config"]
