"""`shipyard serve --workers N`: worker processes behind one set of addresses, under one supervisor."""
