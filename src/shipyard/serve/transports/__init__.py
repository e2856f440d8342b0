"""Transports: thin adapters from the wire (REST, gRPC) to the data plane; error kinds become codes here."""
