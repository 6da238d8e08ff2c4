"""The mapping language: YAML loading with positions, ${ENV} interpolation, the model and its validation."""

from crmbridge.mappings.loader import load_mapping

__all__ = ["load_mapping"]
