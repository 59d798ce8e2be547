"""Trust: PII recognisers and the content guard."""
