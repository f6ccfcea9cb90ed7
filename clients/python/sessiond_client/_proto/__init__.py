"""Protobuf and gRPC stubs, generated from proto/ at build time (see setup.py); not committed."""
