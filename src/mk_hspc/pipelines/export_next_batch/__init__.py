"""The annotation site with the next batch of the active-learning round on its first pages."""
