"""Variants: self-describing folders of compressed models (manifest + safetensors + config)."""

from ffsplit.variant.io import load_variant, save_variant, verify_files
from ffsplit.variant.manifest import read_manifest

__all__ = ["load_variant", "read_manifest", "save_variant", "verify_files"]
