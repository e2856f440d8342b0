"""The protocol's domain: request, response and metadata types, the served signature, tensor encodings."""
