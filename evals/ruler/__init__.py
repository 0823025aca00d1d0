"""`longdata eval ruler`: the RULER-style task families at chosen lengths, with controls."""
