"""mk-hspc: megakaryocytes and HSPCs in whole-slide brightfield bone-marrow CZI images."""

__version__ = "0.1.0"
