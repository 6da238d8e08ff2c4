"""crmbridge: declarative YAML mappings that move customer data between legacy systems, ERPs and CRMs."""

__version__ = "0.1.0"
