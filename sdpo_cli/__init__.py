"""sdpo: stepwise DPO (sDPO, Kim et al. 2024, arXiv:2403.19270) from the command line."""

__version__ = "0.1.0"
