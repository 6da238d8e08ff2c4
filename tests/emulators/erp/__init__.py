"""A local ERP customer-master service that speaks real SOAP 1.1 from a real WSDL (see `server.py`)."""

from .server import ErpServer

__all__ = ["ErpServer"]
