"""Flower NumPyClient subclasses: the benign client and (in `clients.malicious`) attackers."""
